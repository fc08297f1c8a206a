"""AdamW with sparse row gradients: dense exactness, lazy per-row semantics, groups, clipping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moelab.train.optim import SparseAdamW, build_optimizer, clip_grad_norm_


@pytest.fixture(autouse=True)
def _float64():
    """float64 for exact comparisons, restored afterwards (tests share one process)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class _Tiny(nn.Module):
    def __init__(self, sparse: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, sparse=sparse)
        self.lin = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin(self.emb(ids))).pow(2).sum()


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches: list[torch.Tensor]) -> None:
    for ids in batches:
        opt.zero_grad()
        model(ids).backward()
        opt.step()


def test_param_groups_decay_matrices_only() -> None:
    model = _Tiny()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    by_name = {g["name"]: g for g in opt.param_groups}
    decayed = {id(p) for p in by_name["decay"]["params"]}
    assert decayed == {id(model.emb.weight), id(model.lin.weight)}
    assert by_name["decay"]["weight_decay"] == 0.1
    assert by_name["no_decay"]["weight_decay"] == 0.0
    assert len(by_name["no_decay"]["params"]) == 3  # lin.bias, norm.weight, norm.bias


def test_dense_matches_torch_adamw() -> None:
    torch.manual_seed(0)
    a = _Tiny()
    b = _Tiny()
    b.load_state_dict(a.state_dict())
    opt_a = build_optimizer(a, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6)
    groups = [
        {"params": [b.emb.weight, b.lin.weight], "weight_decay": 0.1},
        {"params": [b.lin.bias, b.norm.weight, b.norm.bias], "weight_decay": 0.0},
    ]
    opt_b = torch.optim.AdamW(groups, lr=1e-2, betas=(0.8, 0.95), eps=1e-6)
    batches = [torch.randint(0, 10, (6,)) for _ in range(5)]
    _train(a, opt_a, batches)
    _train(b, opt_b, batches)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-12)


def test_sparse_all_rows_touched_equals_dense_adamw() -> None:
    torch.manual_seed(1)
    a = _Tiny(sparse=True)
    b = _Tiny(sparse=False)
    b.load_state_dict(a.state_dict())
    opt_a = build_optimizer(a, lr=1e-2, weight_decay=0.1)
    opt_b = build_optimizer(b, lr=1e-2, weight_decay=0.1)
    batches = [torch.randperm(10) for _ in range(4)]  # every row in every step
    _train(a, opt_a, batches)
    assert a.emb.weight.grad.is_sparse
    _train(b, opt_b, batches)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-12)


def _reference_lazy(
    w0: torch.Tensor, grads: list[torch.Tensor], touched: list[torch.Tensor], lr: float, wd: float
) -> torch.Tensor:
    """Each row runs plain AdamW over only the steps in which it was touched (slow loop)."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    w = w0.clone()
    for r in range(w.shape[0]):
        m = torch.zeros_like(w[r])
        v = torch.zeros_like(w[r])
        t = 0
        for g, mask in zip(grads, touched, strict=True):
            if not mask[r]:
                continue
            t += 1
            w[r] *= 1 - lr * wd
            m = b1 * m + (1 - b1) * g[r]
            v = b2 * v + (1 - b2) * g[r] ** 2
            w[r] -= lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    return w


def test_sparse_lazy_semantics_match_per_row_reference() -> None:
    torch.manual_seed(2)
    emb = nn.Embedding(12, 5, sparse=True)
    w0 = emb.weight.detach().clone()
    opt = SparseAdamW(emb.parameters(), lr=0.05, weight_decay=0.2)
    grads, touched = [], []
    for step in range(6):
        ids = torch.randint(0, 12, (7,))  # duplicates and untouched rows
        target = torch.randn(7, 5)
        opt.zero_grad()
        (emb(ids) * target).sum().backward()
        g = emb.weight.grad.to_dense()
        mask = torch.zeros(12, dtype=torch.bool)
        mask[ids] = True
        grads.append(g)
        touched.append(mask)
        before = emb.weight.detach().clone()
        opt.step()
        # rows with no gradient this step are bit-for-bit untouched (no decay either)
        assert torch.equal(emb.weight[~mask], before[~mask]), step
    expected = _reference_lazy(w0, grads, touched, lr=0.05, wd=0.2)
    torch.testing.assert_close(emb.weight.detach(), expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(opt.state[emb.weight]["row_step"], torch.stack(touched).sum(0).int())


def test_lr_scheduler_drives_both_groups() -> None:
    model = _Tiny(sparse=True)
    opt = build_optimizer(model, lr=1.0, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    _train(model, opt, [torch.arange(3)])
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]
    opt.load_state_dict(opt.state_dict())  # state round-trips


def test_clip_grad_norm_sparse_equals_dense() -> None:
    torch.manual_seed(3)
    a = _Tiny(sparse=True)
    b = _Tiny(sparse=False)
    b.load_state_dict(a.state_dict())
    ids = torch.tensor([1, 1, 4, 7])
    a(ids).backward()
    b(ids).backward()
    na = clip_grad_norm_(a.parameters(), 0.1)
    nb = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.1)
    torch.testing.assert_close(na.double(), nb.double())
    torch.testing.assert_close(a.emb.weight.grad.to_dense(), b.emb.weight.grad)


def test_c_kernel_and_eager_paths_agree() -> None:
    torch.manual_seed(4)
    for dtype in (torch.float32, torch.float64):
        a = nn.Embedding(50, 16, sparse=True, dtype=dtype)
        b = nn.Embedding(50, 16, sparse=True, dtype=dtype)
        b.load_state_dict(a.state_dict())
        opt_a = SparseAdamW(a.parameters(), lr=1e-2, weight_decay=0.1)
        opt_b = SparseAdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
        opt_b.use_c_kernel = False
        for _ in range(3):
            ids = torch.randint(0, 50, (30,))
            for emb, opt in ((a, opt_a), (b, opt_b)):
                opt.zero_grad()
                emb(ids).pow(2).sum().backward()
                opt.step()
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(a.weight, b.weight, rtol=tol, atol=tol)


def _all_rows_sparse(g: torch.Tensor) -> torch.Tensor:
    """``g`` as a sparse row gradient listing every row (zero rows included: all rows touched)."""
    n = g.shape[0]
    return torch.sparse_coo_tensor(
        torch.arange(n)[None], g, g.shape, is_coalesced=True, check_invariants=True
    )


# max |error| after 6 steps against fp32 AdamW: the parameter is rounded to its dtype every step
# (about steps x eps(dtype) x |p| with |p| <= 0.25 here); fp32 eager computes corrections in fp32
_PRECISION_TOL = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}


@pytest.mark.parametrize("c_kernel", [True, False], ids=["c", "eager"])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_low_precision_params_follow_fp32_adamw(
    dtype: torch.dtype, sparse: bool, c_kernel: bool
) -> None:
    """Issue #9.3: bias corrections in bf16 were 0 forever (rows never moved, zero-gradient entries
    became NaN); fp16 moments underflow. The update must match AdamW on an fp32 copy."""
    gen = torch.Generator().manual_seed(5)
    N, D = 24, 16
    w0 = (torch.randn(N, D, generator=gen) * 0.05).to(dtype)
    grads = []
    for _ in range(6):
        g = (torch.randn(N, D, generator=gen) * 1e-3).to(dtype)
        g[::5] = 0.0  # rows with a zero gradient (still touched)
        g[:, ::7] = 0.0  # zero entries
        grads.append(g)
    p = nn.Parameter(w0.clone())
    opt = SparseAdamW([p], lr=1e-2, weight_decay=0.1)
    opt.use_c_kernel = c_kernel
    ref = nn.Parameter(w0.to(torch.float32))
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    for g in grads:
        p.grad = _all_rows_sparse(g) if sparse else g.clone()
        ref.grad = g.to(torch.float32)
        opt.step()
        ref_opt.step()
        assert p.dtype == dtype and torch.isfinite(p).all()
        torch.testing.assert_close(
            p.detach().float(), ref.detach(), rtol=0.0, atol=_PRECISION_TOL[dtype]
        )
    assert opt.state[p]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("no_c_kernels", [False, True], ids=["c", "eager"])
def test_bfloat16_peer_moves_retrieved_rows_without_nan(
    no_c_kernels: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reported symptom: one step of PEER(dtype=bfloat16) left NaN rows in ``u``."""
    from moelab import native
    from moelab.layers.peer import PEER

    if no_c_kernels:
        monkeypatch.setattr(native, "_KERNELS", {})
        monkeypatch.setenv("MOELAB_NO_C_KERNELS", "1")
    torch.manual_seed(0)
    layer = PEER(16, num_experts=64, heads=2, top_k=4, d_key=8, dtype=torch.bfloat16)
    opt = build_optimizer(layer, lr=1e-2, weight_decay=0.1)
    before = layer.u.detach().clone()
    layer(torch.randn(6, 16, dtype=torch.bfloat16)).float().square().mean().backward()
    g = layer.u.grad.coalesce()
    rows = g.indices()[0][(g.values() != 0).any(1)]  # retrieved with a non-zero gradient (ReLU)
    opt.step()
    assert torch.isfinite(layer.u).all() and torch.isfinite(layer.v).all()
    assert len(rows) > 0 and (layer.u.detach()[rows] != before[rows]).any(1).all()  # all moved


def test_state_dict_round_trip_keeps_fp32_moments_and_int_row_steps() -> None:
    """torch's load_state_dict casts state to the parameter dtype: bf16 moments would lose their
    precision and a bf16 row_step cannot count past 256."""
    emb = nn.Embedding(8, 4, sparse=True, dtype=torch.bfloat16)
    opt = SparseAdamW(emb.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        emb(torch.tensor([1, 2])).float().sum().backward()
        opt.step()
    opt.state[emb.weight]["row_step"][1] = 1001  # a count bf16 cannot hold
    saved = opt.state_dict()
    emb2 = nn.Embedding(8, 4, sparse=True, dtype=torch.bfloat16)
    opt2 = SparseAdamW(emb2.parameters(), lr=1e-3)
    opt2.load_state_dict(saved)
    st = opt2.state[emb2.weight]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(st["exp_avg"], opt.state[emb.weight]["exp_avg"])
    assert st["row_step"].dtype == torch.int32 and int(st["row_step"][1]) == 1001


@pytest.mark.parametrize("c_kernel", [True, False], ids=["c", "eager"])
@pytest.mark.parametrize("chunk", [8192, 37], ids=["one-chunk", "chunks"])
def test_dense_table_optimizer_equals_torch_adamw_on_every_row(
    chunk: int, c_kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``table_optimizer="dense"``: sparse table gradients get textbook AdamW (moment decay and
    weight decay on every row), identical to torch.optim.AdamW with dense gradients."""
    from moelab.layers.peer import PEER
    from moelab.train import optim

    monkeypatch.setattr(optim, "_DENSE_CHUNK", chunk)
    torch.manual_seed(6)
    kw = dict(d_model=8, num_experts=256, heads=1, top_k=2, d_key=4, dtype=torch.float64)
    a = PEER(sparse_grad=True, **kw)
    b = PEER(sparse_grad=False, **kw)
    b.load_state_dict(a.state_dict())
    opt_a = build_optimizer(a, lr=1e-2, weight_decay=0.1, table_optimizer="dense")
    opt_a.use_c_kernel = c_kernel
    groups = [
        {"params": [p for p in b.parameters() if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in b.parameters() if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt_b = torch.optim.AdamW(groups, lr=1e-2)
    u0 = a.u.detach().clone()
    for _ in range(3):
        x = torch.randn(4, 8, dtype=torch.float64)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
        assert a.u.grad.is_sparse
    assert int(a.last_stats.distinct_experts) < 256  # some rows were never retrieved ...
    assert (a.u.detach() != u0).all()  # ... and still moved (weight decay, moment decay)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-12, msg=name)


def test_table_optimizer_default_is_lazy_and_unknown_mode_is_rejected() -> None:
    model = _Tiny(sparse=True)
    assert build_optimizer(model, lr=1e-3, weight_decay=0.0).sparse_mode == "lazy"
    with pytest.raises(
        ValueError,
        match=r"sparse_mode must be one of \('lazy', 'dense', 'rowwise', 'rowwise_bf16'\)",
    ):
        build_optimizer(model, lr=1e-3, weight_decay=0.0, table_optimizer="eager")


def test_switching_table_optimizer_on_resume() -> None:
    """A checkpoint from either mode resumes in the other (both keep per-row step counts), and a
    table that had dense gradients so far (a scalar step) continues lazily with per-row counts."""

    def step(emb: nn.Embedding, opt: SparseAdamW, ids: list[int]) -> torch.Tensor:
        before = emb.weight.detach().clone()
        opt.zero_grad()
        emb(torch.tensor(ids)).sum().backward()
        opt.step()
        return (emb.weight.detach() != before).any(1)  # rows that moved

    torch.manual_seed(7)
    emb = nn.Embedding(10, 3, sparse=True)
    opt = SparseAdamW(emb.parameters(), lr=1e-2, weight_decay=0.1)
    step(emb, opt, [1, 2])
    opt.sparse_mode = "dense"
    assert step(emb, opt, [1, 2]).all()
    assert opt.state[emb.weight]["row_step"].tolist() == [1, 2, 2] + [1] * 7

    opt = SparseAdamW(emb.parameters(), lr=1e-2, weight_decay=0.1, sparse_mode="dense")
    assert step(emb, opt, [3]).all()
    opt.sparse_mode = "lazy"
    assert step(emb, opt, [4]).tolist() == [i == 4 for i in range(10)]
    assert opt.state[emb.weight]["row_step"].tolist() == [1, 1, 1, 1, 2, 1, 1, 1, 1, 1]

    emb.weight.grad = None  # a table trained with dense gradients (sparse_grad=False) so far
    opt = SparseAdamW(emb.parameters(), lr=1e-2, weight_decay=0.1)
    opt.zero_grad()
    emb.weight.grad = torch.ones(10, 3)
    opt.step()
    assert opt.state[emb.weight]["step"] == 1
    assert step(emb, opt, [4]).tolist() == [i == 4 for i in range(10)]
    assert opt.state[emb.weight]["row_step"].tolist() == [1, 1, 1, 1, 2, 1, 1, 1, 1, 1]
