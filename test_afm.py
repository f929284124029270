"""
Tests for the whole project, on CPU with tiny models (the suite runs in a few minutes on 2 cores).

    python -m pytest -q test_afm.py

Cases that compare against the authors' code and the reference libraries read the small
random-weight fixtures in ../shared/fixtures and are skipped when that folder is absent.
"""

import os

import pytest
import torch

import model as M

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "fixtures")


def fixture(name):
    path = os.path.join(FIXTURES, name)
    if not os.path.isfile(path):
        pytest.skip(f"fixture {path} not found")
    return torch.load(path, map_location="cpu", weights_only=True)


TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def randomize(module, std=0.05, seed=0):
    """DiT starts with zero adaLN gates and a zero output layer: give every weight a value so
    that each input visibly matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def tiny_inputs(n=3, c=4, s=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, s, s, generator=g), torch.randint(0, 10, (n,), generator=g),
            torch.rand(n, generator=g), torch.rand(n, generator=g))


# --------------------------------------------------------------------------------------
# model.py
# --------------------------------------------------------------------------------------


def test_release_fixtures_load_and_match():
    """Every tiny release model: same key set, strict load, same output (fp32)."""
    fx = fixture("afm_models.pt")
    classes = {"Generator": M.Generator, "GeneratorDeep": M.Generator, "Discriminator": M.Discriminator,
               "Classifier": M.Classifier}
    for name, e in fx["models"].items():
        m = classes[e["class"]](**e["kwargs"]).eval()
        assert set(m.state_dict()) == set(e["state_dict"]), name
        m.load_state_dict(e["state_dict"], strict=True)
        cases = [(e["inputs"], e["output"])] + [(c["inputs"], c["output"]) for c in e.get("extra_cases", [])]
        for inputs, ref in cases:
            with torch.no_grad():
                out = m(*[inputs[k] for k in e["input_order"]])
            assert out.shape == ref.shape
            assert (out - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max()), name


def test_fixed_embeddings_match_release_helpers():
    h = fixture("afm_models.pt")["helpers"]
    te, pe = h["timestep_embedding"], h["pos_embed_sincos"]
    torch.testing.assert_close(M.timestep_embedding(te["t"], te["dim"], te["max_period"]), te["out"].float(),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(M.pos_embed_sincos(pe["embed_dim"], pe["grid_size"]).float(), pe["out"].float(),
                               atol=1e-6, rtol=0)


def test_pos_embed_formula():
    """Independent reading of the sin-cos recipe: column first, then row; sin then cos."""
    dim, g = 16, 3
    pe = M.pos_embed_sincos(dim, g)
    w = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    k = 5  # token 5 = row 1, col 2
    expect = torch.cat([torch.sin(2 * w), torch.cos(2 * w), torch.sin(1 * w), torch.cos(1 * w)])
    torch.testing.assert_close(pe[k], expect)


@pytest.mark.parametrize("name", list(M.models))
def test_registry_shapes(name):
    """Every registry entry builds and maps its usual input to the right shapes (meta device:
    shapes only, no memory)."""
    c, s = M.default_input(name)
    cfg = M.models[name]
    if s % cfg["patch_size"]:
        pytest.skip("input not divisible by the patch")
    kw = dict(cfg, input_size=s, in_channels=c, num_classes=10)
    with torch.device("meta"):
        x, y, t = torch.randn(2, c, s, s), torch.randint(0, 10, (2,)), torch.rand(2)
        assert M.Generator(**kw, use_t_src=True, use_t_tgt=True)(x, y, t, t).shape == x.shape
        assert M.Generator(**kw, repeat=2)(x, y, t, t).shape == x.shape
        assert M.Discriminator(**kw, use_t=True)(x, y, t).shape == (2,)
        assert M.Classifier(**kw)(x, t).shape == (2, 10)


def test_xl2_parameter_count_matches_dit():
    """DiT-XL/2 has 675,129,632 parameters (learn_sigma=True: 8 output channels; 1001 label rows
    because of class dropout). The same configuration of our Generator must count exactly that."""
    with torch.device("meta"):
        g = M.Generator(**M.models["XL/2"], input_size=32, in_channels=4, learn_sigma=True,
                        class_dropout_prob=0.1, use_t_src=True)
    assert sum(p.numel() for p in g.parameters()) == 675_129_632


@pytest.mark.parametrize("c,s,p", [(1, 8, 2), (3, 16, 4), (4, 8, 1)])
def test_pixel_and_latent_inputs(c, s, p):
    G = randomize(M.Generator(s, p, c, 32, 1, 2, num_classes=10))
    D = randomize(M.Discriminator(s, p, c, 32, 1, 2, num_classes=10))
    x, y = torch.randn(2, c, s, s), torch.tensor([0, 9])
    assert G(x, y).shape == x.shape and D(x, y).shape == (2,)


def test_init_is_adaln_zero():
    """At initialization the generator outputs exactly zero (DiT's zeroed final layer) and every
    block is the identity (zero gates)."""
    G = M.Generator(**TINY, use_t_src=True)
    x, y, t, _ = tiny_inputs()
    assert G(x, y, t).abs().max() == 0
    h = torch.randn(3, 16, 64)
    torch.testing.assert_close(G.blocks[0](h, torch.randn(3, 64)), h)


def test_timestep_conditioning_switches():
    x, y, t1, t2 = tiny_inputs()
    for use_src, use_tgt in [(False, False), (True, False), (False, True), (True, True)]:
        G = randomize(M.Generator(**TINY, use_t_src=use_src, use_t_tgt=use_tgt))
        with torch.no_grad():
            base = G(x, y, t1, t2)
            moved_src = G(x, y, t2, t2)
            moved_tgt = G(x, y, t1, t1)
        assert (base - moved_src).abs().max() > 1e-4 if use_src else torch.equal(base, moved_src)
        assert (base - moved_tgt).abs().max() > 1e-4 if use_tgt else torch.equal(base, moved_tgt)
        assert (G.t_embedder is not None) == use_src and (G.t_tgt_embedder is not None) == use_tgt


def test_deep_generator_repeats_blocks():
    """repeat=2 runs the blocks twice, conditioned on y + t_emb(1000) then y + t_emb(500), and
    the final layer on y alone; t_src/t_tgt are ignored. Checked against a manual composition."""
    deep = randomize(M.Generator(**TINY, repeat=2))
    x, y, t1, t2 = tiny_inputs()
    with torch.no_grad():
        out = deep(x, y, t1, t2)
        assert torch.equal(out, deep(x, y, t2, t1))
        h = deep.x_embedder(x) + deep.pos_embed
        c = deep.y_embedder(y)
        for t in (1.0, 0.5):
            ct = c + deep.t_embedder(torch.full((3,), t * 1000))
            for b in deep.blocks:
                h = b(h, ct)
        manual = deep.unpatchify(deep.final_layer(h, c))
        torch.testing.assert_close(out, manual)
        single = M.Generator(**TINY, use_t_src=True).eval()
        single.load_state_dict(deep.state_dict())  # same keys: one pass of the same weights differs
        assert (single(x, y, torch.ones(3)) - out).abs().max() > 1e-4
    with pytest.raises(ValueError, match="repeat"):
        M.Generator(**TINY, repeat=2, use_t_src=True)


def test_bf16_autocast():
    G = randomize(M.Generator(**TINY, use_t_src=True))
    D = randomize(M.Discriminator(**TINY, use_t=True))
    x, y, t, _ = tiny_inputs()
    with torch.no_grad():
        ref_g, ref_d = G(x, y, t), D(x, y, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_g, out_d = G(x, y, t), D(x, y, t)
    assert out_g.dtype == torch.bfloat16 and torch.isfinite(out_g).all()
    assert (out_g.float() - ref_g).abs().max() < 0.05 * ref_g.abs().max()
    assert (out_d.float() - ref_d).abs().max() < 0.05 * ref_d.abs().max() + 0.01


def test_grad_checkpointing_same_gradients():
    G = randomize(M.Generator(**TINY, use_t_src=True)).train()
    x, y, t, _ = tiny_inputs()
    grads = []
    for ckpt in (False, True):
        G.grad_checkpointing = ckpt
        G.zero_grad()
        G(x, y, t).square().mean().backward()
        grads.append([p.grad.clone() for p in G.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_compile_fullgraph():
    """The tiny generator and discriminator compile as single graphs and agree with eager."""
    G = randomize(M.Generator(**TINY, use_t_src=True, use_t_tgt=True))
    D = randomize(M.Discriminator(**TINY, use_t=True))
    x, y, t1, t2 = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(G, fullgraph=True)(x, y, t1, t2), G(x, y, t1, t2),
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.compile(D, fullgraph=True)(x, y, t1), D(x, y, t1), atol=1e-5, rtol=1e-4)


def test_constructor_errors():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        M.Generator(input_size=9, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2)
