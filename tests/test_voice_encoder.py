"""Voice encoder: Table 1 shapes, parameter count, variable length."""

import pytest
import torch

from speech2face.voice_encoder import VoiceEncoder, VoiceEncoderConfig


def test_paper_preset_parameter_count_and_sizes():
    config = VoiceEncoderConfig.paper()
    # Table 1 written out by hand: conv (4*4*c_in + 1) * c_out, BN 2*c, FC in*out + out.
    convs = [
        (2, 64),
        (64, 64),
        (64, 128),
        (128, 128),
        (128, 128),
        (128, 256),
        (256, 512),
        (512, 512),
        (512, 512),
    ]
    expected = sum((16 * i + 1) * o for i, o in convs)
    expected += sum(2 * o for _, o in convs[:-1]) + 2 * 512  # BNs incl. the pooled one
    expected += (57 * 512 + 1) * 4096 + (4096 + 1) * 4096
    model = VoiceEncoder(config)
    assert sum(p.numel() for p in model.parameters()) == expected == 148_062_976
    assert config.output_shape(598) == (6, 57) and config.flat_dim == 29_184


@torch.no_grad()
def test_table1_intermediate_shapes():
    # Check every block's (T, F) against Table 1's "out" column.
    table1 = [
        (595, 254),
        (592, 251),
        (589, 248),
        (294, 248),
        (291, 245),
        (145, 245),
        (142, 242),
        (71, 242),
        (68, 239),
        (34, 239),
        (31, 236),
        (14, 117),
        (6, 57),
    ]
    model = VoiceEncoder(VoiceEncoderConfig.tiny()).eval()
    x = torch.zeros(1, 2, 598, 257)
    shapes = []
    for block in model.features:
        x = block(x)
        shapes.append(tuple(x.shape[2:]))
    assert shapes == table1


@pytest.mark.parametrize(
    "preset,dim", [("tiny", 128), ("tiny", 4096), ("paper", 4096), ("paper", 128)]
)
@torch.no_grad()
def test_output_shapes(preset, dim):
    model = VoiceEncoder(getattr(VoiceEncoderConfig, preset)(output_dim=dim)).eval()
    batch = 2 if preset == "tiny" else 1  # the paper's encoder: 6 s a clip on a Zen 1
    assert model(torch.randn(batch, 2, 598, 257)).shape == (batch, dim)


@torch.no_grad()
def test_variable_length_and_too_short():
    config = VoiceEncoderConfig.tiny()
    model = VoiceEncoder(config).eval()
    for frames in (config.min_frames(), 298, 1000):  # 298 frames = 3 s (paper's other setting)
        assert model(torch.randn(1, 2, frames, 257)).shape == (1, 128)
    with pytest.raises(ValueError, match="at least"):
        model(torch.randn(1, 2, config.min_frames() - 1, 257))
    with pytest.raises(ValueError, match="expects"):
        model(torch.randn(1, 1, 598, 257))


def test_trains_in_train_mode_and_config_round_trips():
    config = VoiceEncoderConfig.tiny()
    model = VoiceEncoder(config).train()
    out = model(torch.randn(3, 2, 300, 257))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert VoiceEncoderConfig.from_dict(config.to_dict()) == config


def test_one_clip_given_a_batch_dimension_gives_the_batched_result():
    """``spectrogram(clip)[None]`` has a batch stride of 2 (a view), which oneDNN took
    down a slower path; the encoder lays it out afresh: the same numbers either way."""
    from speech2face.audio import spectrogram

    torch.manual_seed(0)
    encoder = VoiceEncoder(VoiceEncoderConfig.tiny()).eval()
    clip = torch.randn(16000 * 3)
    unsqueezed, batched = spectrogram(clip)[None], spectrogram(clip[None])
    assert unsqueezed.stride(0) == 2 and batched.stride(0) == batched[0].numel()
    with torch.no_grad():
        assert torch.equal(encoder(unsqueezed), encoder(batched))
