"""Exporting a distilled student: timm's Hub folder, its model card and curves, publishing it on the Hub."""
