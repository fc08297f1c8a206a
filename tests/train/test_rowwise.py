"""Row-wise Adam for the product-key tables (``optim.table_optimizer: rowwise`` / ``rowwise_bf16``)
against a per-row Python loop, the C kernel against the eager path, modes and resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moelab.config import ConfigError
from moelab.train.config import resolve_run_config
from moelab.train.optim import SparseAdamW, build_optimizer

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, sparse=True, dtype=torch.float64)
        self.lin = nn.Linear(4, 3, dtype=torch.float64)
        self.norm = nn.LayerNorm(3, dtype=torch.float64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin(self.emb(ids))).pow(2).sum()


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches: list[torch.Tensor]) -> None:
    for ids in batches:
        opt.zero_grad()
        model(ids).backward()
        opt.step()


def _rowwise_reference(
    p: torch.Tensor, grads: list[tuple[list[int], torch.Tensor]], hp: tuple, bf16_m: bool
) -> torch.Tensor:
    """Row-wise Adam written as a loop over steps and rows in Python floats (float64)."""
    lr, b1, b2, eps, wd = hp
    p = p.double().clone()
    N, D = p.shape
    m = [[0.0] * D for _ in range(N)]
    v, t = [0.0] * N, [0] * N
    for rows, vals in grads:
        for r, g in zip(rows, vals.double().tolist(), strict=True):
            t[r] += 1
            v[r] = b2 * v[r] + (1 - b2) * sum(x * x for x in g) / D
            denom = (v[r] / (1 - b2 ** t[r])) ** 0.5 + eps
            for d in range(D):
                m_new = m[r][d] + (1 - b1) * (g[d] - m[r][d])
                m[r][d] = (
                    float(torch.tensor(m_new, dtype=torch.float64).to(torch.bfloat16))
                    if bf16_m
                    else m_new
                )
                p[r, d] = p[r, d] * (1 - lr * wd) - lr * (m_new / (1 - b1 ** t[r])) / denom
    return p


@pytest.mark.parametrize("mode", ["rowwise", "rowwise_bf16"])
@pytest.mark.parametrize(
    "dtype,c_kernel", [(torch.float64, False), (torch.float32, False), (torch.float32, True)]
)
def test_rowwise_table_optimizer_matches_a_per_row_loop(
    mode: str, dtype: torch.dtype, c_kernel: bool
) -> None:
    g = torch.Generator().manual_seed(2)
    N, D = 7, 5
    table = nn.Parameter(torch.randn(N, D, generator=g, dtype=dtype))
    start = table.detach().clone()
    hp = (1e-2, 0.9, 0.99, 1e-8, 0.1)
    opt = SparseAdamW([table], lr=hp[0], betas=hp[1:3], eps=hp[3], weight_decay=hp[4])
    opt.sparse_mode, opt.use_c_kernel = mode, c_kernel
    grads = []
    for rows in ([1, 3], [3, 4, 6], [0, 3], [6]):  # row 2 and 5 never touched
        vals = torch.randn(len(rows), D, generator=g, dtype=dtype)
        grads.append((rows, vals))
        table.grad = torch.sparse_coo_tensor(torch.tensor([rows]), vals, (N, D))
        opt.step()
    ref = _rowwise_reference(start, grads, hp, bf16_m=mode == "rowwise_bf16")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(table.detach().double(), ref, rtol=tol, atol=tol)
    state = opt.state[table]
    assert state["exp_avg_sq_row"].shape == (N,) and "exp_avg_sq" not in state
    m_dtype = torch.bfloat16 if mode == "rowwise_bf16" else dtype
    assert state["exp_avg"].dtype == m_dtype
    assert state["row_step"].tolist() == [1, 1, 0, 3, 1, 0, 2]
    assert torch.equal(table.detach()[[2, 5]], start[[2, 5]])


def test_rowwise_c_kernel_equals_eager_path() -> None:
    g = torch.Generator().manual_seed(4)
    N, D = 50, 33
    for mode in ("rowwise", "rowwise_bf16"):
        tables = [nn.Parameter(torch.randn(N, D, generator=g, dtype=torch.float32))]
        tables.append(nn.Parameter(tables[0].detach().clone()))
        opts = [SparseAdamW([t], lr=1e-2, weight_decay=0.1, sparse_mode=mode) for t in tables]
        opts[1].use_c_kernel = False
        for _ in range(4):
            rows = torch.randperm(N, generator=g)[:20].sort().values
            vals = torch.randn(20, D, generator=g, dtype=torch.float32)
            for t, o in zip(tables, opts, strict=True):
                t.grad = torch.sparse_coo_tensor(rows[None], vals, (N, D))
                o.step()
        # float32, different summation order of mean(g²): close, not bitwise
        torch.testing.assert_close(tables[0], tables[1], rtol=1e-5, atol=1e-6)
        st = [o.state[t] for o, t in zip(opts, tables, strict=True)]
        tol = 8e-3 if mode == "rowwise_bf16" else 1e-6  # one bf16 rounding step apart at most
        m0, m1 = st[0]["exp_avg"].float(), st[1]["exp_avg"].float()
        torch.testing.assert_close(m0, m1, rtol=tol, atol=tol)


def test_rowwise_mode_leaves_dense_parameters_on_exact_adamw() -> None:
    torch.manual_seed(0)
    a, b = _Tiny(), _Tiny()
    b.load_state_dict(a.state_dict())
    opt_a = build_optimizer(a, lr=1e-2, weight_decay=0.1, table_optimizer="rowwise")
    opt_b = build_optimizer(b, lr=1e-2, weight_decay=0.1)
    _train(a, opt_a, [torch.tensor([1, 2, 2])])  # one step: identical gradients everywhere
    _train(b, opt_b, [torch.tensor([1, 2, 2])])
    assert "exp_avg_sq_row" in opt_a.state[a.emb.weight]
    assert not torch.equal(a.emb.weight, b.emb.weight)  # the table: another optimizer
    for name in ("lin.weight", "lin.bias", "norm.weight", "norm.bias"):  # the rest: exact AdamW
        assert torch.equal(a.get_parameter(name), b.get_parameter(name)), name


def test_rowwise_resume_and_switching_modes() -> None:
    torch.manual_seed(1)
    emb = nn.Embedding(10, 3, sparse=True, dtype=torch.float64)
    opt = SparseAdamW(emb.parameters(), lr=1e-2, weight_decay=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()  # lazy AdamW state: continue row-wise from each row's mean second moment
    v_mean = opt.state[emb.weight]["exp_avg_sq"].mean(1)
    opt.sparse_mode = "rowwise_bf16"
    opt.zero_grad()
    emb(torch.tensor([5])).sum().backward()
    opt.step()
    st = opt.state[emb.weight]
    assert "exp_avg_sq" not in st and st["exp_avg"].dtype == torch.bfloat16
    torch.testing.assert_close(st["exp_avg_sq_row"][[1, 2]], v_mean[[1, 2]])
    assert st["row_step"].tolist() == [0, 1, 1, 0, 0, 1, 0, 0, 0, 0]

    saved = opt.state_dict()  # a checkpoint keeps the row-wise state in its dtypes
    opt2 = SparseAdamW(emb.parameters(), lr=1e-2, weight_decay=0.1, sparse_mode="rowwise_bf16")
    opt2.load_state_dict(saved)
    opt2.zero_grad()
    emb(torch.tensor([5])).sum().backward()
    opt2.step()
    assert opt2.state[emb.weight]["exp_avg"].dtype == torch.bfloat16
    assert opt2.state[emb.weight]["row_step"].dtype == torch.int32

    opt2.sparse_mode = "lazy"
    with pytest.raises(ValueError, match=r"table is row-wise .*continue with one of those"):
        opt2.step()


def test_rowwise_config_option_is_validated() -> None:
    cfg = resolve_run_config("peer-tiny", overrides=["optim.table_optimizer=rowwise_bf16"])
    assert cfg.optim.table_optimizer == "rowwise_bf16"
    with pytest.raises(
        ConfigError, match=r"optim.table_optimizer: must be one of .*'rowwise_bf16'"
    ):
        resolve_run_config("peer-tiny", overrides=["optim.table_optimizer=rowwise_fp8"])
