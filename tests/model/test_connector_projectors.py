import torch
from torch import nn

from xsam.model import config
from xsam.model.connector import SegConnector
from xsam.model.pixel_shuffle import pixel_shuffle
from xsam.model.projectors import MLPProjector, SegProjector


def test_connector_tiny():
    cfg = config.tiny()
    g, c = cfg.sam.grid, cfg.sam.embed_dim
    conn = SegConnector(c, cfg.decoder.connector_dim)
    outs = conn([torch.randn(2, g, g, c) for _ in range(3)])
    assert conn.out_channels == [c // 2, c, 2 * c]
    assert [tuple(o.shape) for o in outs] == [(2, c // 2, 2 * g, 2 * g), (2, c, g, g), (2, 2 * c, g // 2, g // 2)]
    # each level reads its own input only
    feats = [torch.randn(1, g, g, c) for _ in range(3)]
    base = conn(feats)
    feats[2] = feats[2] + 1.0
    moved = conn(feats)
    assert torch.equal(base[0], moved[0]) and torch.equal(base[1], moved[1]) and not torch.equal(base[2], moved[2])


def test_connector_level_layout():
    conn = SegConnector(8, 4)
    convs = [m for m in conn.levels[0] if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in convs] == [(8, 4, (1, 1)), (4, 4, (3, 3)),
                                                                               (4, 16, (1, 1))]
    assert [m.out_channels for m in conn.levels[2] if isinstance(m, nn.Conv2d)][-1] == 4


def test_connector_paper_on_meta():
    cfg = config.paper()
    with torch.device("meta"):
        conn = SegConnector(cfg.sam.embed_dim, cfg.decoder.connector_dim)
        outs = conn([torch.empty(1, 64, 64, 1024) for _ in range(3)])
    assert conn.out_channels == [512, 1024, 2048]
    assert [tuple(o.shape) for o in outs] == [(1, 512, 128, 128), (1, 1024, 64, 64), (1, 2048, 32, 32)]


def test_mlp_projector():
    mlp = MLPProjector(6, 10)
    layers = list(mlp.layers)
    assert [type(m) for m in layers] == [nn.Linear, nn.GELU, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features, layers[2].out_features) == (6, 10, 10)
    assert MLPProjector(6, 4, hidden_dim=3).layers[0].out_features == 3
    assert sum(isinstance(m, nn.Linear) for m in MLPProjector(6, 4, depth=3).layers) == 3
    assert mlp(torch.randn(2, 5, 6)).shape == (2, 5, 10)


def test_seg_projector():
    cfg = config.tiny()
    g, c, d = cfg.sam.grid, cfg.sam.embed_dim, cfg.llm.hidden_size
    proj = SegProjector(c, d)
    feat = torch.randn(2, g, g, c)
    tokens, tmap = proj(feat), proj.forward_map(feat)
    assert tokens.shape == (2, cfg.sam.num_tokens, d) == (2, 16, 64)
    assert tmap.shape == (2, g // 2, g // 2, d)
    assert torch.equal(tokens, tmap.flatten(1, 2))
    assert torch.allclose(tmap, proj.mlp(pixel_shuffle(feat, 0.5)))


def test_projectors_paper_on_meta():
    cfg = config.paper()
    with torch.device("meta"):
        seg = SegProjector(cfg.sam.embed_dim, cfg.llm.hidden_size)
        img = MLPProjector(cfg.siglip.hidden_size, cfg.llm.hidden_size)
        tokens = seg(torch.empty(1, 64, 64, 1024))
    assert tokens.shape == (1, 1024, 3072)
    assert seg.mlp.layers[0].weight.shape == (3072, 4096)
    assert img.layers[0].weight.shape == (3072, 1152) and img.layers[2].weight.shape == (3072, 3072)
