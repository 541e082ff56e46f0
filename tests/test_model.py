import torch

from mae_search.config import PRESETS, ModelConfig, model_preset
from mae_search.mae.model import Attention, MaskedAutoencoderViT, attention, encoder_state_dict


def test_encoder_sees_only_visible_tokens_plus_cls():
    cfg = ModelConfig(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                      decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    model = MaskedAutoencoderViT(cfg)
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    out = model(torch.randn(2, 3, 16, 16), mask_ratio=0.75)
    assert seen == [1 + 4]  # 16 patches, 4 kept
    assert out.pred.shape == (2, 16, 48)
    assert out.latent.shape == (2, 5, 32)


def test_position_embeddings_added_before_masking():
    """A visible token must carry the position of the patch it came from, not its slot after shuffling."""
    cfg = ModelConfig(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                      decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    model = MaskedAutoencoderViT(cfg)
    imgs = torch.randn(1, 3, 16, 16)
    full = model.embed(imgs)
    captured = {}
    model.blocks[0].register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
    torch.manual_seed(0)
    _, mask, _ = model.forward_encoder(imgs, 0.5)
    visible_rows = full[0, mask[0] == 0]
    fed = captured["x"][0, 1:]
    for row in fed:
        assert torch.isclose(visible_rows, row).all(dim=1).any()


def test_presets_build_and_paper_decoder():
    for name in ("vit-b16", "vit-l16", "vit-h14"):
        cfg = model_preset(name)
        assert (cfg.decoder_embed_dim, cfg.decoder_depth) == (512, 8)
    assert set(PRESETS) >= {"tiny", "vit-b16", "vit-l16", "vit-h14"}
    model = MaskedAutoencoderViT(model_preset("tiny"))
    assert model(torch.randn(1, 3, 32, 32)).pred.shape == (1, 64, 48)


def test_encoder_state_dict_has_no_decoder():
    model = MaskedAutoencoderViT(model_preset("tiny"))
    keys = encoder_state_dict(model)
    assert keys and not any(k.startswith("decoder") or k == "mask_token" for k in keys)
    assert "cls_token" in keys and "blocks.0.attn.qkv.weight" in keys


def test_attention_kernel_choice_on_cpu_gives_sdpa_results(monkeypatch):
    """Short CPU sequences take the plain softmax path, long ones SDPA; both match SDPA, forward and backward."""
    import mae_search.mae.model as model_module

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v):
        calls.append(q.shape[-2])
        return sdpa(q, k, v)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)
    threshold = Attention.cpu_sdpa_min_tokens
    for n in (17, threshold - 1, threshold):
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 3, n, 8, requires_grad=True) for _ in range(3))
        out = attention(q, k, v, threshold)
        expected_q, expected_k, expected_v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        expected = sdpa(expected_q, expected_k, expected_v)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        out.square().sum().backward()
        expected.square().sum().backward()
        for got, want in ((q, expected_q), (k, expected_k), (v, expected_v)):
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)
    assert calls == [threshold]  # only the sequence at the threshold went through the spy
    attention(*(torch.randn(1, 1, 4, 8) for _ in range(3)), cpu_sdpa_min_tokens=0)
    assert calls == [threshold, 4]  # 0 = SDPA at every length


def _micro(**extra) -> ModelConfig:
    return ModelConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                       decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, **extra)


def test_encoder_mask_token_runs_the_encoder_on_every_token():
    """'w/ [M]': all 16 positions (+ CLS) enter the encoder, removed ones as the learned mask token."""
    model = MaskedAutoencoderViT(_micro(encoder_mask_token=True))
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    imgs = torch.randn(2, 3, 16, 16)
    out = model(imgs, mask_ratio=0.75)
    assert seen[0].shape[1] == 1 + 16 and out.latent.shape == (2, 17, 32) and out.pred.shape == (2, 16, 48)
    removed = out.mask[0].bool()
    token = model.encoder_mask_token[0, 0] + model.pos_embed[0, 1:]
    assert torch.allclose(seen[0][0, 1:][removed], token[removed])
    assert torch.allclose(seen[0][0, 1:][~removed], model.embed(imgs)[0][~removed])


def test_with_nothing_masked_the_mask_token_encoder_equals_the_visible_only_one():
    """Ratio 0: same weights, same tokens, so the same encoder output (today's comes in shuffled order)."""
    torch.manual_seed(0)
    plain = MaskedAutoencoderViT(_micro()).eval()
    with_token = MaskedAutoencoderViT(_micro(encoder_mask_token=True)).eval()
    missing, unexpected = with_token.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["encoder_mask_token"] and not unexpected
    imgs = torch.randn(3, 3, 16, 16)
    torch.manual_seed(1)
    latent, _, ids_restore = plain.forward_encoder(imgs, 0.0)
    torch.manual_seed(1)
    full, mask, _ = with_token.forward_encoder(imgs, 0.0)
    assert not mask.any()
    in_order = torch.gather(latent[:, 1:], 1, ids_restore.unsqueeze(-1).expand(-1, -1, latent.shape[-1]))
    assert torch.allclose(full[:, 1:], in_order, atol=1e-5) and torch.allclose(full[:, 0], latent[:, 0], atol=1e-5)


def test_default_model_is_unchanged_by_the_option():
    """Without encoder_mask_token the model has no extra parameter (old checkpoints load as they are)."""
    assert "encoder_mask_token" not in dict(MaskedAutoencoderViT(_micro()).named_parameters())
