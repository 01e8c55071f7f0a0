"""FLOPs counting against hand computations."""

import pytest
import torch
from torch import nn

from topkast_cli.flops import count_flops, total, training_flops
from topkast_cli.sparsity import TopKAST


def small_net():
    # (1, 10) -> Conv1d k3 -> (4, 8) -> flatten 32 -> Linear -> 5
    return nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 5))


def test_dense_counts_match_hand_computation():
    layers = count_flops(small_net(), torch.randn(1, 1, 10))
    conv, fc = layers
    # conv: 8 output positions x 4 filters x (1 channel x 3 taps) multiply-adds = 96 MACs
    assert (conv.name, conv.type, conv.output_shape) == ("0", "Conv1d", [4, 8])
    assert conv.dense_flops == conv.flops == 2 * 96
    # linear: 32 x 5 multiply-adds
    assert fc.dense_flops == fc.flops == 2 * 160
    assert total(layers) == {"dense_flops": 512, "flops": 512, "ratio": 1.0}


def test_strided_grouped_conv2d_and_linear_over_a_sequence():
    net = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), nn.Flatten(2), nn.Linear(16, 3))
    conv, fc = count_flops(net, torch.randn(1, 4, 8, 8))
    # 4x4 output positions x 6 filters x (4/2 channels x 3x3 taps) = 1728 MACs
    assert conv.output_shape == [6, 4, 4] and conv.dense_flops == 2 * 1728
    # the linear layer is applied to each of the 6 rows: 6 x 16 x 3 = 288 MACs
    assert fc.dense_flops == 2 * 288


def test_zero_weights_are_not_counted():
    net = small_net()
    with torch.no_grad():
        net[0].weight[:2] = 0  # two of the four filters: half of the conv's work
        net[3].weight[:, :8] = 0  # a quarter of the linear weights
    conv, fc = count_flops(net, torch.randn(1, 1, 10))
    assert conv.nonzero == 6 and conv.flops == conv.dense_flops // 2
    assert fc.nonzero == 120 and fc.flops == 2 * 120
    assert total([conv, fc])["ratio"] == pytest.approx((96 + 240) / 512)


def test_counts_the_effective_weight_of_sparse_layers():
    net = small_net()
    method = TopKAST(forward=0.75, dense_first=False).attach(net)
    conv, fc = count_flops(net, torch.randn(1, 1, 10))
    k_conv, k_fc = (layer.k_forward for layer in method.layers)
    assert (k_conv, k_fc) == (3, 40)  # round(0.25 x 12), round(0.25 x 160)
    assert conv.type == "Conv1d" and conv.nonzero == k_conv and conv.flops == 2 * k_conv * 8
    assert fc.nonzero == k_fc and fc.flops == 2 * k_fc
    method.use_dense_weights(True)
    conv, fc = count_flops(net, torch.randn(1, 1, 10))
    assert conv.flops == conv.dense_flops and fc.flops == fc.dense_flops


def test_needs_one_sample_and_restores_the_mode():
    net = small_net().train()
    with pytest.raises(ValueError):
        count_flops(net, torch.randn(2, 1, 10))
    count_flops(net, torch.randn(1, 1, 10))
    assert net.training
    assert not any(m._forward_hooks for m in net.modules())


def test_training_flops_are_forward_and_input_gradient_on_a_and_weight_gradient_on_b():
    net = small_net()
    method = TopKAST(forward=0.75, backward=0.5, dense_first=True).attach(net)  # the conv stays dense
    conv, fc = count_flops(net, torch.randn(1, 1, 10))
    (layer,) = method.layers
    assert (layer.k_forward, layer.k_backward) == (40, 80)
    # dense conv: 3 x its forward (8 positions x 12 weights); sparse linear: 2 x 40 on A + 80 on B
    expected = 3 * 2 * 12 * 8 + 2 * (2 * 40 + 80)
    assert training_flops([conv, fc], {"3": layer.k_backward}) == expected
    assert training_flops([conv, fc], {}) == 3 * 2 * 12 * 8 + 2 * (2 * 40 + 160)  # no B given: every weight


def test_the_run_summary_has_training_flops_per_token_of_a_language_model(tmp_path):
    from conftest import make_config
    from test_language_model import lm_overrides, write_text
    from topkast_cli.run import build_run, kept_torch_settings
    from topkast_cli.summary import train_flops

    cfg = make_config([*lm_overrides(write_text(tmp_path / "t.txt")), "sparsity.forward=0.8", "sparsity.backward=0.6"])
    with kept_torch_settings():
        run = build_run(cfg)
    # Per token, each Linear weight once: 2 blocks of width 32, attention 4 x 32², MLP 2 x 32 x 128
    # (the tied output layer is F.linear with the embedding: not a module, not counted).
    block = 4 * 32 * 32 + 2 * 32 * 128
    out = train_flops(run)
    assert out["train_flops_per"] == "token"
    assert out["dense_train_flops"] == 3 * 2 * 2 * block
    assert out["train_flops"] == sum(2 * (2 * l.k_forward + l.k_backward) for l in run.method.layers)
