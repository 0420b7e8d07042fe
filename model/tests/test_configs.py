import pytest

from cfrsam.configs import (
    CONFIG_NAMES,
    CFRSAMConfig,
    ConfigError,
    get_config,
    make_config,
    resolve_prompt_learner_config,
)


def test_presets_validate_and_match_sam_dimensions():
    b, h, tiny = get_config("b"), get_config("h"), get_config("tiny")
    assert (b.image_encoder.embed_dim, b.image_encoder.depth, b.image_encoder.num_heads) == (768, 12, 12)
    assert (h.image_encoder.embed_dim, h.image_encoder.depth, h.image_encoder.num_heads) == (1280, 32, 16)
    assert b.image_encoder.global_attn_indexes == (2, 5, 8, 11) == b.hmfm.levels
    assert h.image_encoder.global_attn_indexes == (7, 15, 23, 31) == h.hmfm.levels
    for cfg in (b, h):
        assert cfg.image_encoder.window_size == 14 and cfg.image_encoder.out_chans == 256
        assert (cfg.decoder.transformer_dim, cfg.decoder.num_heads, cfg.decoder.mlp_dim) == (256, 8, 2048)
        assert cfg.peft.mala_rank == 64 and cfg.peft.mala_kernel_sizes == (3, 5, 7)
    assert tiny.input_size == 256 and tiny.hmfm.levels == (1, 3, 5)
    assert tiny.class_names == ("other", "inflammatory", "epithelial", "spindle-shaped")
    assert tiny.num_classes == 4 and tiny.mpp == 0.25
    assert tiny.coarse_dim == tiny.decoder.transformer_dim // 8 + 1


def test_unknown_config_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_config("xl")
    for name in CONFIG_NAMES:
        assert name in str(err.value)


@pytest.mark.parametrize("size", [48, 100, 250])
def test_bad_input_size(size):
    with pytest.raises(ConfigError, match="multiple of 16"):
        make_config("tiny", input_size=size, window=32)


def test_window_must_fit():
    make_config("tiny", input_size=64)  # the default window (64) just fits
    with pytest.raises(ConfigError, match="window"):
        make_config("tiny", input_size=64, window=96)
    with pytest.raises(ConfigError, match="window"):
        make_config("tiny", window=30)


def test_overrides_and_round_trip():
    cfg = make_config("tiny", input_size=128, peft_mode="lora", image_encoder__depth=4, hmfm__levels=[1, 3], window=32)
    assert cfg.input_size == 128 and cfg.peft.mode == "lora" and cfg.image_encoder.depth == 4
    again = CFRSAMConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ConfigError, match="unknown"):
        make_config("tiny", image_encoder__nope=1)
    with pytest.raises(ConfigError, match="hmfm.levels"):
        make_config("tiny", depth=3, hmfm__levels=[1, 5])
    shallow = make_config("b", depth=2, input_size=64, window=32)
    assert shallow.image_encoder.global_attn_indexes == () and shallow.hmfm.levels == (1,)


def test_conv_stem_round_trips_and_is_checked():
    cfg = make_config("tiny", image_encoder__conv_stem=[32, 64, 128])
    assert cfg.image_encoder.conv_stem == (32, 64, 128)
    assert CFRSAMConfig.from_dict(cfg.to_dict()) == cfg
    assert make_config("tiny").image_encoder.conv_stem == ()  # SAM's encoder has none
    with pytest.raises(ConfigError, match="1 to 5"):
        make_config("tiny", image_encoder__conv_stem=[8, 16, 32, 64, 96, 128])
    with pytest.raises(ConfigError, match="positive"):
        make_config("tiny", image_encoder__conv_stem=[8, 0])


def test_prompter_needs_multiple_of_32():
    with pytest.raises(ConfigError, match="prompt learner"):
        make_config("tiny", input_size=80, window=32)


def test_prompt_learner_config_follows_model():
    cfg = make_config("tiny", input_size=128, window=32)
    pl = resolve_prompt_learner_config(cfg)
    assert pl.input_size == 128 and pl.num_classes == cfg.num_classes
