"""Speed levers (vaekit.codec.levers) keep the model's numbers, and the benchmark script runs end to end on CPU."""

import copy
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from diffusers.models.upsampling import Upsample2D

from vaekit.codec import levers as fast
from vaekit.errors import VaekitError

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench.py"

torch.set_num_threads(1)


def tiny_vae(seed=0):
    """The diffusers test config: two levels, 32/64 channels, 8 groups, with mid-block attention."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=8)
    # Random non-trivial norm affines, so a GroupNorm that dropped its scale or shift would show.
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return vae.eval()


def run_both(vae, x, z):
    """(posterior mean of x, decoded z) without gradients."""
    with torch.no_grad():
        return vae.encode(x).latent_dist.mean, vae.decode(z).sample


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1  # (B, 3, H, W)
    z = torch.randn(2, 4, 16, 16, generator=g)  # (B, 4, h, w): the tiny config downsamples 2x
    return x, z


# ----------------------------------------------------------------------------------------------
# optimize_vae: each lever against the untouched model


def test_diffusers_default_attention_is_sdpa():
    # The `sdpa` lever only restates diffusers' default; if diffusers changes it, the lever matters again.
    vae = tiny_vae()
    assert vae.attn_processors and all(type(p) is AttnProcessor2_0 for p in vae.attn_processors.values())


def test_channels_last_matches_and_keeps_keys(inputs):
    x, z = inputs
    vae = tiny_vae()
    want = run_both(vae, x, z)
    fast_vae = fast.optimize_vae(copy.deepcopy(vae), channels_last=True)
    assert fast_vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    got = run_both(fast_vae, x, z)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert list(fast_vae.state_dict()) == list(vae.state_dict())
    assert fast.applied_levers(fast_vae).channels_last


def test_sdpa_switch_selects_processor_and_matches(inputs):
    x, z = inputs
    vae = tiny_vae()
    want = run_both(vae, x, z)
    plain = fast.optimize_vae(copy.deepcopy(vae), channels_last=False, sdpa=False)
    assert all(type(p) is AttnProcessor for p in plain.attn_processors.values())
    for a, b in zip(run_both(plain, x, z), want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    back = fast.optimize_vae(plain, channels_last=False, sdpa=True)
    assert all(type(p) is AttnProcessor2_0 for p in back.attn_processors.values())


def test_fused_groupnorm_falls_back_to_exact_aten_on_cpu(inputs):
    x, z = inputs
    vae = tiny_vae()
    want = run_both(vae, x, z)
    fused = fast.optimize_vae(copy.deepcopy(vae), channels_last=False, fused_groupnorm=True)
    norms = [m for m in fused.modules() if isinstance(m, fast.GroupNormAct)]
    resnets = [m for m in vae.modules() if type(m).__name__ == "ResnetBlock2D"]
    # Two per resnet, one per attention, one per output norm: every GroupNorm was swapped.
    assert len(norms) == 2 * len(resnets) + 2 + 2
    assert not [m for m in fused.modules() if type(m) is torch.nn.GroupNorm]
    assert sum(1 for m in norms if not m.silu) == 2  # attention norms have no activation after them
    got = run_both(fused, x, z)
    for a, b in zip(got, want):
        assert torch.equal(a, b)  # the same aten ops in the same order: bit for bit
    assert list(fused.state_dict()) == list(vae.state_dict())


def test_fused_groupnorm_shares_parameters_and_trains_identically(inputs):
    x, _ = inputs
    vae = tiny_vae()
    fused = fast.optimize_vae(copy.deepcopy(vae), channels_last=False, fused_groupnorm=True)
    resnet = fused.decoder.up_blocks[0].resnets[0]
    assert isinstance(resnet.norm1, fast.GroupNormAct) and isinstance(resnet.nonlinearity, torch.nn.Identity)
    assert dict(fused.named_parameters())["decoder.up_blocks.0.resnets.0.norm1.weight"] is resnet.norm1.weight
    grads = []
    for model in (vae, fused):
        model.zero_grad()
        model(x).sample.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)


def test_group_norm_act_auto_backend_is_aten_on_cpu():
    x = torch.randn(2, 16, 5, 7).to(memory_format=torch.channels_last)
    w, b = torch.randn(16), torch.randn(16)
    assert not fast.triton_usable(x, w, b)
    torch.testing.assert_close(fast.group_norm_act(x, 4, w, b, 1e-6, silu=True),
                               F.silu(F.group_norm(x, 4, w, b, 1e-6)), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(2, 5, 6, 9), (1, 3, 1, 4)])
def test_upsample_conv_is_nearest_upsample_then_conv_exactly(shape):
    torch.manual_seed(0)
    layer = Upsample2D(shape[1], use_conv=True, out_channels=7).double()
    fused = fast.UpsampleConv(layer)
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(fused(x), layer(x), rtol=0, atol=1e-12)


def test_upsample_conv_gradients_and_cache_follow_the_weights():
    torch.manual_seed(0)
    layer = Upsample2D(4, use_conv=True).double()
    fused = fast.UpsampleConv(layer)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    g_ref = torch.autograd.grad(layer(x).sin().sum(), [x, layer.conv.weight, layer.conv.bias])
    g_fast = torch.autograd.grad(fused(x).sin().sum(), [x, fused.conv.weight, fused.conv.bias])
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # Inference caches the combined kernel; an in-place weight update (an optimizer step, a
    # load_state_dict) must invalidate it.
    with torch.no_grad():
        before = fused(x)
        layer.conv.weight.mul_(-0.5)
        torch.testing.assert_close(fused(x), layer(x), rtol=0, atol=1e-12)
        assert not torch.allclose(before, fused(x))


def test_fused_upsample_model_matches_and_keeps_keys(inputs):
    x, z = inputs
    vae = tiny_vae()
    want = run_both(vae, x, z)
    fused = fast.optimize_vae(copy.deepcopy(vae), channels_last=True, fused_upsample=True)
    assert isinstance(fused.decoder.up_blocks[0].upsamplers[0], fast.UpsampleConv)
    for a, b in zip(run_both(fused, x, z), want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert list(fused.state_dict()) == list(vae.state_dict())
    # Loading weights saved from the optimised model into a plain one gives the same model back.
    plain = tiny_vae(seed=5)
    plain.load_state_dict(fused.state_dict())
    for a, b in zip(run_both(plain, x, z), want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_all_levers_together_and_idempotent(inputs):
    x, z = inputs
    vae = tiny_vae()
    want = run_both(vae, x, z)
    levers = dict(channels_last=True, sdpa=True, fused_groupnorm=True, fused_upsample=True, fuse_qkv=True)
    once = fast.optimize_vae(copy.deepcopy(vae), **levers)
    twice = fast.optimize_vae(copy.deepcopy(once), **levers)
    for model in (once, twice):
        for a, b in zip(run_both(model, x, z), want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # A second pass wraps nothing twice.
    def count(model, cls):
        return sum(1 for m in model.modules() if isinstance(m, cls))

    assert count(twice, fast.UpsampleConv) == count(once, fast.UpsampleConv) == 1
    assert all(type(m.source[0]) is Upsample2D for m in twice.modules() if isinstance(m, fast.UpsampleConv))
    assert count(twice, fast.GroupNormAct) == count(once, fast.GroupNormAct) == count(vae, torch.nn.GroupNorm)


def test_parse_levers():
    config = fast.parse_levers("channels_last, compile")
    assert fast.lever_names(config) == ["channels_last", "compile"]
    assert fast.lever_names(fast.parse_levers("none")) == []
    with pytest.raises(VaekitError, match="Unknown speed lever 'warp'"):
        fast.parse_levers("channels_last,warp")


@pytest.mark.slow
def test_compile_matches_eager_on_cpu(inputs):
    # Inductor on a 2-core CPU takes minutes for one graph, hence slow.
    x, z = inputs
    vae = tiny_vae()
    want = run_both(vae, x, z)
    compiled = fast.optimize_vae(copy.deepcopy(vae), channels_last=True, fused_upsample=True, compile=True)
    for a, b in zip(run_both(compiled, x, z), want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert list(compiled.state_dict()) == list(vae.state_dict())
    with pytest.raises(VaekitError, match="already compiled"):
        fast.optimize_vae(compiled, compile=True)


# ----------------------------------------------------------------------------------------------
# The Triton GroupNorm kernels, without a GPU: numerics in Triton's interpreter, and an sm_90 build

needs_triton = pytest.mark.skipif(fast.triton is None, reason="triton is not installed")

INTERPRETER_CHECK = textwrap.dedent("""
    import json, torch, torch.nn.functional as F
    from vaekit.codec.levers import group_norm_act
    torch.manual_seed(0)
    cases = [((2, 32, 6, 5), 8, False, "fp32"), ((2, 32, 6, 5), 8, True, "fp32"), ((1, 16, 3, 3), 16, True, "fp32"),
             ((2, 64, 4, 4), 8, True, "bf16")]
    out = []
    for shape, groups, channels_last, dtype in cases:
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        x = (torch.randn(shape) * 3 + 2).to(dt)  # an offset mean tests the variance merge
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        w, b = torch.randn(shape[1]).to(dt), torch.randn(shape[1]).to(dt)
        for silu in (True, False):
            y = group_norm_act(x, groups, w, b, 1e-6, silu, backend="triton")
            ref = group_norm_act(x, groups, w, b, 1e-6, silu, backend="aten")
            err = (y.float() - ref.float()).abs().max().item()
            out.append(dict(case=str((shape, channels_last, dtype, silu)), err=err,
                            same_strides=y.stride() == x.stride(), dtype_ok=y.dtype == x.dtype))
    x = torch.randn(2, 20, 16).transpose(1, 2)  # (B, C, L) with channel stride 1: the attention norm's input
    w, b = torch.randn(16), torch.randn(16)
    y = group_norm_act(x, 8, w, b, 1e-6, False, backend="triton")
    out.append(dict(case="attention", err=(y - F.group_norm(x, 8, w, b, 1e-6)).abs().max().item(),
                    same_strides=True, dtype_ok=True))
    print(json.dumps(out))
""")


@needs_triton
def test_triton_group_norm_matches_aten_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", INTERPRETER_CHECK], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for r in results:
        tol = 0.05 if "bf16" in r["case"] else 2e-5  # bf16 output rounding: 2^-8 of values up to ~6
        assert r["err"] <= tol, r
        assert r["same_strides"] and r["dtype_ok"], r


# An H200 has 132 SMs, so its launch aims at 4 * 132 programs and splits each group's statistics into
# chunks; the cases below are split the same way (several chunks per group, a short last chunk, and
# chunks of several tiles), in Triton's interpreter.
H200_PROGRAMS = 4 * 132

MULTI_CHUNK_CHECK = textwrap.dedent("""
    import json, sys, torch, torch.nn.functional as F
    from vaekit.codec.levers import group_norm_act, plan_group_launch
    torch.manual_seed(0)
    cases = json.loads(sys.argv[1])
    out = []
    for shape, groups, programs, channels_last, dtype in cases:
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        x = (torch.randn(shape) * 3 + 2).to(dt)  # an offset mean tests the merge of the chunks' statistics
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        w, b = torch.randn(shape[1]).to(dt), torch.randn(shape[1]).to(dt)
        length = shape[2] * shape[3]
        launch = plan_group_launch(shape[0], groups, shape[1] // groups, length, programs)
        for silu in (True, False):
            y = group_norm_act(x, groups, w, b, 1e-6, silu, backend="triton", programs=programs)
            ref = F.group_norm(x.float(), groups, w.float(), b.float(), 1e-6)
            ref = F.silu(ref) if silu else ref
            out.append(dict(case=str((shape, groups, programs, channels_last, dtype, silu)), dtype=dtype,
                            err=((y.float() - ref).abs() / ref.abs().clamp_min(1)).max().item(),
                            chunks=launch.chunks, tiles_per_chunk=launch.chunk // launch.block_l,
                            last_chunk=length - (launch.chunks - 1) * launch.chunk, chunk=launch.chunk,
                            same_strides=y.stride() == x.stride()))
    print(json.dumps(out))
""")


def test_h200_launch_splits_sd_group_norms_into_chunks():
    # The sd decoder at 1024 px, batch 1: 32 groups of 4-16 channels over 128^2 to 1024^2 positions.
    for channels, side in ((128, 1024), (256, 512), (512, 256), (512, 128)):
        launch = fast.plan_group_launch(1, 32, channels // 32, side * side, H200_PROGRAMS)
        # ceil(528 / 32) = 17 chunks of the group, 16 where the tiles divide into 16 whole-tile chunks
        assert launch.chunks in (16, 17), (channels, side, launch)
        assert launch.chunks * launch.chunk >= side * side > (launch.chunks - 1) * launch.chunk
    # At batch 16 there are already 512 groups: one chunk each, no split.
    assert fast.plan_group_launch(16, 32, 4, 256 * 256, H200_PROGRAMS).chunks == 2
    assert fast.plan_group_launch(17, 32, 4, 256 * 256, H200_PROGRAMS).chunks == 1


@needs_triton
def test_triton_group_norm_with_several_chunks_per_group_matches_aten_in_interpreter():
    cases = [[(1, 64, 40, 40), 4, H200_PROGRAMS, False, "fp32"],  # 7 chunks of one tile, the last one short
             [(1, 64, 40, 40), 4, H200_PROGRAMS, True, "fp32"],
             [(1, 64, 40, 40), 4, 12, True, "fp32"],  # 3 chunks of 3 tiles each, the last one short
             [(2, 32, 24, 36), 2, H200_PROGRAMS, True, "bf16"],
             [(1, 16, 33, 31), 1, H200_PROGRAMS, False, "fp32"]]  # an odd length: 1023 positions
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", MULTI_CHUNK_CHECK, json.dumps(cases)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * len(cases)
    for r in results:
        assert r["chunks"] > 1 and 0 < r["last_chunk"] <= r["chunk"], r
        # Error relative to max(|value|, 1): at most one bf16 step (2^-7 of the value) where the rounding of
        # two fp32 results a hair apart lands on either side; fp32 agrees to a few ulps.
        tol = 2**-7 if r["dtype"] == "bf16" else 2e-6
        assert r["err"] <= tol, r
        assert r["same_strides"], r
    assert any(r["tiles_per_chunk"] > 1 for r in results)
    assert any(r["last_chunk"] < r["chunk"] for r in results)


@needs_triton
def test_triton_group_norm_kernels_build_for_sm90(monkeypatch):
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # the current default, stated to silence its notice
    try:
        from triton.backends.compiler import GPUTarget
    except ImportError:
        pytest.skip("this triton has no GPUTarget")
    ints = ["length", "per_group", "groups", "stride_b", "stride_c", "stride_l"]
    stats = {"x_ptr": "*bf16", "partial_ptr": "*fp32", **{k: "i32" for k in ints + ["chunk", "chunks"]},
             "BLOCK_L": "constexpr", "BLOCK_C": "constexpr"}
    apply = {"x_ptr": "*bf16", "y_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "partial_ptr": "*fp32",
             **{k: "i32" for k in ints + ["ystride_b", "ystride_c", "ystride_l", "chunks"]}, "eps": "fp32",
             "SILU": "constexpr", "BLOCK_L": "constexpr", "BLOCK_C": "constexpr", "BLOCK_S": "constexpr"}
    target = GPUTarget("cuda", 90, 32)  # H100 / H200
    try:
        a = fast.triton.compile(fast.triton.compiler.ASTSource(
            fn=fast._group_norm_stats_kernel, signature=stats, constexprs={"BLOCK_L": 256, "BLOCK_C": 16}),
            target=target)
        b = fast.triton.compile(fast.triton.compiler.ASTSource(
            fn=fast._group_norm_apply_kernel, signature=apply,
            constexprs={"SILU": True, "BLOCK_L": 256, "BLOCK_C": 16, "BLOCK_S": 64}), target=target)
    except (RuntimeError, FileNotFoundError) as e:
        if "ptxas" in str(e).lower():
            pytest.skip(f"no ptxas to build with: {e}")
        raise
    assert a.asm["cubin"] and b.asm["cubin"]


# ----------------------------------------------------------------------------------------------
# On a GPU (skipped without one): the real kernel and the levers on CUDA

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_group_norm_on_cuda_matches_aten(channels_last, dtype):
    torch.manual_seed(0)
    x = (torch.randn(2, 128, 48, 40, device="cuda") * 3 + 2).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(128, device="cuda", dtype=dtype), torch.randn(128, device="cuda", dtype=dtype)
    with torch.no_grad():
        assert fast.triton_usable(x, w, b)
        got = fast.group_norm_act(x, 32, w, b, 1e-6, silu=True)
    want = F.silu(F.group_norm(x.float(), 32, w.float(), b.float(), 1e-6))
    torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-5 if dtype == torch.float32 else 0.05)
    assert got.stride() == x.stride()


@pytest.mark.gpu
@needs_cuda
def test_all_levers_on_cuda_match_eager(inputs):
    x, z = (t.cuda() for t in inputs)
    vae = tiny_vae().cuda()
    want = run_both(vae, x, z)
    levers = dict(channels_last=True, fused_groupnorm=fast.triton is not None, fused_upsample=True, fuse_qkv=True)
    got = run_both(fast.optimize_vae(copy.deepcopy(vae), **levers), x, z)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)  # TF32 convolutions on both sides


# ----------------------------------------------------------------------------------------------
# scripts/bench.py


def load_bench():
    spec = importlib.util.spec_from_file_location("vaekit_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_runs_on_cpu_and_writes_report(tmp_path):
    out, js = tmp_path / "bench.md", tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--device", "cpu", "--preset", "tiny", "--dtype", "fp32",
           "--decode_sizes", "32", "--encode_sizes", "32", "--encode_batch", "2", "--max_batch", "2",
           "--train_size", "32", "--train_batch", "1", "--warmup", "1", "--repeats", "1", "--threads", "1",
           "--variants", "eager,vaekit", "--levers", "channels_last,fused_upsample,fused_groupnorm",
           "--lpips_net", "alex",
           "--out", str(out), "--json", str(js)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = out.read_text()
    assert "| decode 32px | diffusers eager | 1 |" in report
    assert "| decode 32px | vaekit [channels_last,fused_upsample,fused_groupnorm] | 2 |" in report
    assert "| train 32px | diffusers plain step | 1 |" in report and "vaekit step [" in report
    rows = json.loads(js.read_text())["rows"]
    # decode at batch 1 and 2, encode, train: each with the baseline and vaekit, all measured and gated.
    assert len(rows) == 8
    for row in rows:
        assert row["error"] is None, row
        assert row["seconds"] > 0 and row["flops"] > 0 and row["peak_mib"] > 0, row
        assert row["gate_ok"] and row["psnr_db"] >= 45, row
    assert report in done.stdout


def test_bench_gate_failure_is_not_claimed():
    bench = load_bench()
    rows = [bench.Row("decode 64px", "decode", "diffusers eager", "eager", 1, seconds=0.2, psnr_db=60, gate_ok=True,
                      flops=2e12),
            bench.Row("decode 64px", "decode", "fast but wrong", "vaekit", 1, seconds=0.1, psnr_db=30, gate_ok=False,
                      flops=2e12),
            bench.Row("decode 64px", "decode", "fast and right", "ablation", 1, seconds=0.1, psnr_db=50,
                      gate_ok=True, flops=2e12)]
    table = bench.render_table(rows, peak=100.0)
    wrong = next(line for line in table.splitlines() if "fast but wrong" in line)
    right = next(line for line in table.splitlines() if "fast and right" in line)
    assert "not claimed" in wrong and "30.0 FAIL" in wrong and "2.00x" not in wrong
    assert "2.00x" in right and "50.0 ok" in right and "| 20.000 | 20.0 |" in right  # 2e12 / 0.1 s = 20 TFLOP/s


def test_bench_psnr_uses_reference_range():
    bench = load_bench()
    ref = torch.linspace(0, 0.1, 100).reshape(1, 100)  # spans 0.1, as a random-init decoder's output might
    out = ref + 0.001
    # 10 log10(0.1^2 / 0.001^2) = 40 dB; against a fixed range of 2 it would read 66 dB and pass.
    assert bench.psnr_against(out, ref) == pytest.approx(40.0, abs=1e-3)


def test_bench_rejects_bad_arguments():
    bench = load_bench()
    with pytest.raises(VaekitError, match="Unknown workload"):
        bench.resolve_defaults(bench.parse_args(["--device", "cpu", "--workloads", "decode,paint"]))
    with pytest.raises(VaekitError, match="Unknown speed lever"):
        bench.resolve_defaults(bench.parse_args(["--device", "cpu", "--levers", "turbo"]))
