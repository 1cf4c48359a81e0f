"""Each distillation loss on small inputs whose value is worked out by hand (or by an independent numpy loop)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pat_hf.distillers.bkd import bkd_loss
from pat_hf.distillers.correlation import correlation_loss
from pat_hf.distillers.crd import nce_contrast_loss
from pat_hf.distillers.dist import dist_loss
from pat_hf.distillers.dkd import dkd_loss
from pat_hf.distillers.ofa import ofa_loss
from pat_hf.distillers.rkd import pairwise_distances, rkd_angle_loss, rkd_distance_loss

torch.set_num_threads(1)


def logits_of(probabilities: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probabilities, dtype=torch.float64).log()


def test_bkd_is_log2_for_uniform_teacher_and_zero_logits():
    assert float(bkd_loss(torch.zeros(1, 2), torch.zeros(1, 2))) == pytest.approx(math.log(2), rel=1e-6)


def test_bkd_averages_binary_cross_entropies_over_classes():
    # The teacher's softmax is (3/4, 1/4); each student logit is a binary prediction of that probability.
    student, teacher = torch.tensor([[2.0, -1.0]]), torch.tensor([[math.log(3.0), 0.0]])

    def log_sigmoid(z: float) -> float:
        return -math.log1p(math.exp(-z))

    first = -(0.75 * log_sigmoid(2.0) + 0.25 * log_sigmoid(-2.0))
    second = -(0.25 * log_sigmoid(-1.0) + 0.75 * log_sigmoid(1.0))
    assert float(bkd_loss(student, teacher)) == pytest.approx((first + second) / 2, rel=1e-6)


def test_dkd_splits_target_and_non_target_terms():
    student = logits_of([[0.5, 0.3, 0.2]])
    teacher = logits_of([[0.8, 0.1, 0.1]])
    target = torch.tensor([0])
    # Binary (target, rest): teacher (0.8, 0.2) against student (0.5, 0.5).
    tckd = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    # Non-target classes renormalised: teacher (0.5, 0.5) against student (0.6, 0.4).
    nckd = 0.5 * math.log(0.5 / 0.6) + 0.5 * math.log(0.5 / 0.4)
    assert float(dkd_loss(student, teacher, target, 1.0, 2.0, 1.0)) == pytest.approx(tckd + 2 * nckd, rel=1e-6)
    assert float(dkd_loss(student, teacher, target, 3.0, 0.0, 1.0)) == pytest.approx(3 * tckd, rel=1e-6)


def test_dkd_with_temperature_matches_numpy():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    target = np.array([4, 0, 2])
    temperature = 2.0

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max())
        return e / e.sum()

    expected = 0.0
    for s, t, y in zip(student / temperature, teacher / temperature, target):
        p_s, p_t = softmax(s), softmax(t)
        b_s, b_t = np.array([p_s[y], 1 - p_s[y]]), np.array([p_t[y], 1 - p_t[y]])
        q_s, q_t = np.delete(p_s, y) / (1 - p_s[y]), np.delete(p_t, y) / (1 - p_t[y])
        expected += 0.5 * np.sum(b_t * np.log(b_t / b_s)) + 1.5 * np.sum(q_t * np.log(q_t / q_s))
    expected *= temperature**2 / len(target)
    loss = dkd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(target), 0.5, 1.5, temperature)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_dist_is_zero_for_identical_and_four_for_opposite_predictions():
    predictions = logits_of([[0.75, 0.25], [0.25, 0.75]])
    assert float(dist_loss(predictions, predictions)) == pytest.approx(0.0, abs=1e-6)
    # Every row and every column of the student is perfectly anti-correlated with the teacher's.
    assert float(dist_loss(predictions, predictions.flip(0))) == pytest.approx(4.0, rel=1e-6)
    assert float(dist_loss(predictions, predictions.flip(0), beta=0.5, gamma=0.0)) == pytest.approx(1.0, rel=1e-6)


def test_ofa_loss_with_eps_one_is_the_teacher_cross_entropy():
    student, teacher = logits_of([[0.5, 0.25, 0.25]]), logits_of([[0.25, 0.5, 0.25]])
    mask = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    expected = -(0.25 * math.log(0.5) + 0.5 * math.log(0.25) + 0.25 * math.log(0.25))
    assert float(ofa_loss(student, teacher, mask, eps=1.0)) == pytest.approx(expected, rel=1e-6)


def test_ofa_loss_weights_target_and_other_classes_by_eps():
    student, teacher = logits_of([[0.5, 0.25, 0.25]]), logits_of([[0.25, 0.5, 0.25]])
    mask = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    # Target class: (1 + 0.25)^2 - 1 = 0.5625; others: 0.5^2 and 0.25^2.
    expected = -(0.5625 * math.log(0.5) + 0.25 * math.log(0.25) + 0.0625 * math.log(0.25))
    assert float(ofa_loss(student, teacher, mask, eps=2.0)) == pytest.approx(expected, rel=1e-6)


def test_rkd_distances_of_a_3_4_5_triangle():
    points = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    expected = torch.tensor([[0.0, 3.0, 4.0], [3.0, 0.0, 5.0], [4.0, 5.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(pairwise_distances(points), expected)
    torch.testing.assert_close(pairwise_distances(points, squared=True), expected**2)


def test_rkd_distance_loss_ignores_scale_and_compares_normalised_distances():
    student = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    assert float(rkd_distance_loss(student, 2 * student)) == pytest.approx(0.0, abs=1e-12)
    teacher = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # Normalised by their means: student (3, 4, 5) / 4, teacher (1, 1, sqrt 2) / ((2 + sqrt 2) / 3).
    mean_t = (2 + math.sqrt(2)) / 3
    differences = [3 / 4 - 1 / mean_t, 4 / 4 - 1 / mean_t, 5 / 4 - math.sqrt(2) / mean_t]
    # Smooth-L1 (all |x| < 1: x^2 / 2) over the 9 entries, each off-diagonal pair counted twice.
    expected = 2 * sum(d * d / 2 for d in differences) / 9
    assert float(rkd_distance_loss(student, teacher)) == pytest.approx(expected, rel=1e-9)


def test_rkd_angle_loss_matches_a_triplet_loop():
    rng = np.random.default_rng(1)
    student, teacher = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))

    def angles(x: np.ndarray) -> list[float]:
        values = []
        for i in range(len(x)):
            for j in range(len(x)):
                for k in range(len(x)):
                    u, v = x[j] - x[i], x[k] - x[i]
                    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                    values.append(0.0 if nu == 0 or nv == 0 else float(u @ v / (nu * nv)))
        return values

    difference = np.array(angles(student)) - np.array(angles(teacher))
    expected = np.mean(np.where(np.abs(difference) < 1, 0.5 * difference**2, np.abs(difference) - 0.5))
    loss = rkd_angle_loss(torch.tensor(student), torch.tensor(teacher))
    assert float(loss) == pytest.approx(expected, rel=1e-9)


def test_correlation_multiplies_consecutive_differences():
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    # |delta| rows (1, 2), (3, 4), (0, 0): consecutive products sum to 3 + 8 = 11, then 0.
    assert float(correlation_loss(student, torch.zeros_like(student))) == pytest.approx(5.5)
    assert float(correlation_loss(student, -student)) == pytest.approx(22.0)


def test_nce_contrast_loss_with_noise_ratio_one_half():
    # K = 2 negatives over N = 4 examples: the noise term K/N is 1/2.
    scores = torch.tensor([[0.5, 0.5, 1.5]], dtype=torch.float64)
    expected = -(math.log(0.5 / 1.0) + math.log(0.5 / 1.0) + math.log(0.5 / 2.0))
    assert float(nce_contrast_loss(scores, num_examples=4)) == pytest.approx(expected, rel=1e-6)


def test_nce_contrast_loss_averages_over_the_batch():
    scores = torch.tensor([[0.5, 0.5, 1.5], [1.5, 0.5, 0.5]], dtype=torch.float64)
    first = -(math.log(0.5) + math.log(0.5) + math.log(0.25))
    second = -(math.log(1.5 / 2.0) + 2 * math.log(0.5))
    assert float(nce_contrast_loss(scores, num_examples=4)) == pytest.approx((first + second) / 2, rel=1e-6)
