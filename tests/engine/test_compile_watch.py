"""compile_watch: what a Triton compilation is reported as, before and after the warm-up.

The hooks are called here as Triton calls them (keyword arguments, the same shapes of
values), so these tests need no Triton; tests/engine/test_cuda.py checks the hooks
installed in Triton on a GPU."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from engine.runtime.cuda.compile_watch import CompileWatch, _chained, describe_change, specialization

NAMES = ["q_ptr", "ctx_ptr", "stride_table", "PDL"]
OPTIONS = "{'num_warps': 4, 'launch_pdl': True}"


def compiled(ctx_aligned: bool, pdl: int) -> dict:
    """A `compile` argument of Triton's hooks for a kernel with NAMES as its arguments."""
    aligned = [(0,), (2,)] + ([(1,)] if ctx_aligned else [])
    return {"signature": {"q_ptr": "*bf16", "ctx_ptr": "*i64", "stride_table": "i32", "PDL": "constexpr"},
            "constants": {(3,): pdl}, "configs": [{i: [["tt.divisibility", 16]] for i in aligned}]}


def key(ctx_aligned: bool, pdl: int) -> str:
    spec = [("*bf16", "D"), ("*i64", "D" if ctx_aligned else ""), ("i32", "D"), ("constexpr", pdl)]
    return str(spec) + OPTIONS


FN = SimpleNamespace(name="_paged_decode_kernel", jit_function=SimpleNamespace(arg_names=NAMES))


def compile_once(watch: CompileWatch, ctx_aligned: bool, pdl: int) -> None:
    kwargs = dict(key=key(ctx_aligned, pdl), repr="...", fn=FN, compile=compiled(ctx_aligned, pdl),
                  is_manual_warmup=False, already_compiled=False)
    assert watch.before(**kwargs) is None  # Triton compiles
    watch.after(**kwargs)


def test_specialization_reads_constants_alignment_and_launch_options():
    spec = specialization(NAMES, key(False, 2), compiled(False, 2))
    assert spec == {"q_ptr": "*bf16/16", "ctx_ptr": "*i64", "stride_table": "i32/16", "PDL": "=2",
                    "launch options": OPTIONS}


def test_describe_change_names_what_differs():
    before = specialization(NAMES, key(True, 2), compiled(True, 2))
    now = specialization(NAMES, key(False, 1), compiled(False, 1))
    assert describe_change(before, now) == "differs from the previous compilation in ctx_ptr: *i64/16 -> *i64, PDL: =2 -> =1"
    assert describe_change(None, now) == "first compilation: PDL=1"


def test_only_compilations_after_the_warm_up_are_warnings(caplog):
    watch = CompileWatch()
    with caplog.at_level(logging.DEBUG, logger="engine.runtime.cuda.compile_watch"):
        compile_once(watch, ctx_aligned=True, pdl=2)  # during the warm-up
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert watch.compiled_while_serving == 0
        watch.mark_warm()
        compile_once(watch, ctx_aligned=False, pdl=2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and watch.compiled_while_serving == 1
    assert "_paged_decode_kernel after the warm-up" in warnings[0]
    assert "ctx_ptr: *i64/16 -> *i64" in warnings[0] and "PDL" not in warnings[0]


def test_chained_hooks_call_both_and_keep_the_earlier_hooks_answer():
    calls = []
    ours = lambda **kw: calls.append(("ours", kw["key"]))  # noqa: E731
    theirs = lambda **kw: calls.append(("theirs", kw["key"])) or True  # noqa: E731
    assert _chained(ours, theirs)(key="k") is True  # theirs may skip the compilation
    assert calls == [("ours", "k"), ("theirs", "k")]
    assert _chained(ours, None) is ours
