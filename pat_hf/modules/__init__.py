"""Building blocks of the distillers: the token grid every feature distiller lays stages on, shape projectors,
PAT's named quirks, prompt blocks and region attention, and the baselines' grid aligners, branch heads and
contrastive memory."""
