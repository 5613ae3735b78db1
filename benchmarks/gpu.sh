#!/usr/bin/env bash
# One script for a lent CUDA machine (see benchmarks/RESULTS.md "GPU"); every part is capped so
# that one slow part cannot eat the others' time, and every table is teed into $OUT.
#  1. sampling.py on a trained Fashion-MNIST checkpoint: FID-style score vs NFE per scheduler
#     (the same numbers the CPU would give, minutes instead of hours);
#  2. unet_train.py: DDPM-CIFAR-10 preset, batch 128: fp32, bf16 autocast, bf16 + channels_last
#     + torch.compile, + CUDA graphs (reduce-overhead); difflab vs diffusers' UNet2DModel;
#     img/s and % of the measured bf16 matmul rate;
#  3. profile_step.py: the eager bf16 step's kernels by kind (convolutions, Triton, elementwise,
#     copies...) and the convolutions' achieved TFLOP/s, cuDNN's algorithm search off and on;
#     part "mfu" (not in the default PARTS, ~8 min, one call with part mfuprof:
#     PARTS=mfu,mfuprof MFU_LOOP_S=0, timeout_s=590): the CUDA-graph step of difflab as it
#     ships with bf16 weights (-w16; since the sixteenth session the GroupNorm statistics from
#     per-channel sums: 7,323 img/s, 34.4 % on an H100) and candidates (-w16-pad8,
#     -w16-pad8-gnoff, -w16-pad8-ck, -w16-pad8-rng; compiled side by side in subprocesses
#     first), each one's gradients checked against eager float32 first, and eager
#     diffusers; then the whole loop (MFU_LOOP_S=0 skips it) and the CUDA test of the shipped
#     compiled model against eager PyTorch — the measurements for the matmul-rate goal;
#     part "mfuprof" (~2 min; in the same call it profiles part mfu's fastest): the kernel
#     profile;
#     part "gncl" (~3 min): why the compiled layout-keeping GroupNorm's gradients were wrong on
#     an H100 (tests/test_cuda.py, narrowed down by op, block, form and inductor setting);
#  4. train_loop.py: difflab's whole training loop (EMA, clipping, guard, LR schedule) on the
#     same preset: eager bf16 (train ddpm's GPU default), with bf16 weights, and compiled with
#     CUDA graphs; with .before/src carried, an earlier difflab's loop first (before/after);
#  5. the training tests, whose loop then runs on CUDA.  PARTS=sampling,loop,... picks parts;
#     with the race in PARTS and TESTS_BESIDE_RACE=1 they run beside it (they time nothing).
#  6. (not in the default PARTS; ~6 min; ran in the seventh session) the quality race replayed:
#     each contestant trains the steps its 20-minute CPU budget reached, then 5,000 samples each are
#     scored (quality_race.py --replay-steps; RACE_STEPS overrides the step counts).
# Carried (git-ignored) folders: .whl (diffusers wheels), .before/src (part 4), .gpu/ckpt (a `difflab train ddpm`
# run's model folder), .gpu/data/fashion-mnist (IDX files), .gpu/cache (the feature
# classifier). Wheels are made with
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 --platform any -d .whl \
#     diffusers==0.42.1 importlib_metadata
#   (part 6 also: denoising-diffusion-pytorch==2.3.4 ema-pytorch==0.8.3 pytorch-fid==0.3.0)
# and the call is  run(command="bash benchmarks/gpu.sh", carry=[".whl", ".gpu"], timeout_s=590)
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s); BUDGET=${GPU_BUDGET_S:-570}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# cap WANT RESERVE: WANT seconds, or fewer so that RESERVE seconds stay for what comes after
cap() { local l=$(( $(left) - $2 )); echo $(( l < $1 ? (l > 10 ? l : 10) : $1 )); }
# rest RESERVE: what is left but RESERVE seconds, at least 10 (timeout 0 means no limit; a
# negative one makes timeout fail and the part not run)
rest() { cap 1000000 "$1"; }
# fresh NAME.json: remove a part's earlier output, so that a part that times out before it
# writes (or does not run) never ships an older run's file as its own
fresh() { rm -f "benchmarks/out/$1"; }
PARTS=${PARTS:-sampling,unet,profile,loop,tests}  # a later call can rerun only some parts
want() { [[ ",$PARTS," == *",$1,"* ]]; }
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT/extra"  # at most 8 files come back: JSON and
# pictures go to extra/, packed into one extra.tgz at the end
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export DIFFLAB_DATA="$PWD/.gpu/data" DIFFLAB_CACHE="$PWD/.gpu/cache" DIFFLAB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"

if want sampling && [ -d .gpu/ckpt ]; then
  echo "== 1. sampling: FID-style vs NFE ($(left) s left)"
  fresh sampling.json
  TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 timeout "${SAMPLING_S:-230}" python3 benchmarks/sampling.py \
    --ckpt .gpu/ckpt --device cuda --n "${SAMPLING_N:-2000}" --batch 2000 \
    --schedulers 'ddpm;ddim;dpm++;dpm++:{"algorithm_type": "dpmsolver++", "solver_type": "midpoint"};euler' \
    --steps 10,20,50,100,1000 \
    --max-minutes "$(awk "BEGIN{print ${SAMPLING_S:-230} / 60 - 0.25}")" \
    2>&1 | tee "$OUT/sampling.txt"
  cp benchmarks/out/sampling.json "$OUT/extra/" 2>/dev/null
fi

if want unet; then
echo "== 2. U-Net training step, DDPM-CIFAR-10 preset ($(left) s left)"
fresh unet_train.json
timeout "${UNET_S:-$(rest 120)}" python3 benchmarks/unet_train.py --preset ddpm-cifar10 \
  --batch 128 --device cuda --iters 15 --rounds 3 \
  --modes "${UNET_MODES:-fp32,bf16,bf16-cl-compile,bf16-cl-ro}" \
  --peers "${UNET_PEERS:-difflab,difflab-fold,diffusers,diffusers-cl}" \
  --compile-peers "${UNET_COMPILE_PEERS:-difflab,difflab-fold}" 2>&1 | tee "$OUT/unet_train.txt"
cp benchmarks/out/unet_train.json "$OUT/extra/" 2>/dev/null
fi

# parts mfu, mfuprof and loop: the model and batch (a dry run of their logic on a CPU:
# MFU_DEVICE=cpu MFU_PRESET=small MFU_BATCH=8, for part loop also LOOP_STEPS=20)
MFU=(--preset "${MFU_PRESET:-ddpm-cifar10}" --batch "${MFU_BATCH:-128}"
     --device "${MFU_DEVICE:-cuda}")
if want mfu; then  # the matmul-rate goal (issue 5), sized to fit one call with the start
# 3m-a. The CUDA-graph step (reduce-overhead) of difflab as it ships for CUDA (the
# thirteenth session's defaults: the layout-keeping GroupNorm in plain operators, folded
# upsampling, realize_reads=6 when compiled; the fourteenth's: the 22 residual blocks' time
# projections in one product, their stacked weights concatenated by one kernel:
# max_pointwise_cat_inputs=32; the sixteenth's: GroupNorm statistics from per-channel sums),
# with bf16 weight copies kept between steps (-w16, --bf16-weights: 7,323 img/s, 34.4 %;
# before the sixteenth, -gnops-w16, 6,813 in the same run), and candidates:
#   -pad8   the 3-channel first and last convolutions zero-padded to 8 channels (in the
#           sixteenth session's profile one input gradient alone ran 0.34 ms on a pre-Hopper
#           cuDNN kernel, 2.7 TFLOP/s: a pixel of 3 bf16 channels is 6 bytes, off the 16-byte
#           alignment of the fast kernels); each candidate below is -pad8 plus one change:
#   -gnoff  conv1's bias and time projection handed to the sums-form GroupNorm (22 fewer
#           extern kernels, 0.3 GB less by a CPU count; the seventeenth session's);
#   -ck     inductor's combo kernels: independent small kernels (e.g. the GroupNorms'
#           per-channel sums) launched as one (never timed: the twelfth and sixteenth
#           sessions' calls ran out of time before its compile);
#   -rng    dropout's random numbers functionalised (masks recomputed in the backward
#           instead of 22 stored ones);
# cuDNN's algorithm search (-bench: 26 workspace-zeroing kernels, 0.28 ms, in that profile)
# is an MFU_PEERS choice for a later call; suffixes in benchmarks/_common.py. Eager bf16
# first (the peers, diffusers: the 1.5× reference). Each peer's gradients are checked against
# eager float32 of its own model (tolerance: 1.5× what a right peer's error is anyway: eager
# bf16's rounding, for a compiled peer other dropout masks), then it is timed at once
# (printed: a cut-off run keeps those); one that fails to compile is dropped; then all are
# timed interleaved.
echo "== 3m. MFU: the CUDA-graph step, difflab vs before and a candidate ($(left) s left)"
# (compiles took ~55-125 s each, one after another, much of it on one core: since the 19th
# session they first run side by side, MFU_WARM_JOBS at a time, in subprocesses that fill
# inductor's on-disk caches, and each peer's compile here then loads its graphs from there
# (printed: "N graphs from inductor's cache"); MFU_WARM_JOBS=0: one after another as before.
# Warm-ups still running after MFU_WARM_S (180 s) are stopped, so that the timing here keeps
# the time to compile and time its peers within this part's cap.
# -cdt, inductor's coordinate-descent tuning, is not among them: it compiles each Triton
# kernel's neighbouring block sizes one by one, reported 5-10x the compile time)
MFU_PEERS=${MFU_PEERS:-difflab-w16,difflab-w16-pad8,difflab-w16-pad8-gnoff,difflab-w16-pad8-ck,difflab-w16-pad8-rng}
fresh unet_train.json
timeout "$(cap "${MFU_UNET_S:-400}" 150)" python3 benchmarks/unet_train.py "${MFU[@]}" \
  --iters 10 --rounds 3 --modes bf16,bf16-ro --warm-compiles "${MFU_WARM_JOBS:-5}" \
  --warm-timeout "${MFU_WARM_S:-180}" \
  --peers "$MFU_PEERS,diffusers" --compile-peers "$MFU_PEERS" 2>&1 | tee "$OUT/mfu_unet.txt"
cp benchmarks/out/unet_train.json "$OUT/extra/mfu_unet.json" 2>/dev/null
# the fastest compiled candidate with right gradients: from the table, else from the
# provisional readings of a cut-off run, else difflab
BEST=$(python3 -c 'import json, re, sys
try:
    rows = {r["model"]: r["img/s"] for r in json.load(open(sys.argv[1]))["rows"]
            if r["mode"] == "bf16-ro" and r["model"].startswith("difflab")
            and r.get("grads") != "WRONG"}
except (OSError, ValueError):  # (a peer with wrong gradients is no candidate)
    rows = {m: float(v.replace(",", "")) for m, v, bad in re.findall(
        r"^bf16-ro (difflab\S*): first step .* then ([\d,]+) img/s(.*)$",
        open(sys.argv[2]).read(), re.M) if "WRONG" not in bad}
print(max(rows, key=rows.get) if rows else "difflab")' \
  benchmarks/out/unet_train.json "$OUT/mfu_unet.txt" 2>/dev/null || echo difflab)
echo "== 3m. fastest compiled: $BEST ($(left) s left)"
# 3m-b. the whole training loop (EMA, clipping, guard) compiled as it ships and, if a variant
# was faster, with that (its eager configs were measured in the twelfth and thirteenth
# sessions: 1,296-1,487 img/s, --bf16-weights +4-6 %)
# (MFU_LOOP_S=0 / MFU_TESTS_S=0 skip 3m-b / 3m-c, e.g. to leave part mfuprof time in one call)
SUFFIX=${BEST#difflab}
fresh train_loop.json
if [ "${MFU_LOOP_S:-140}" != 0 ]; then
timeout "$(cap "${MFU_LOOP_S:-140}" 60)" python3 benchmarks/train_loop.py "${MFU[@]}" --steps 60 \
  --configs "bf16-ro${SUFFIX:+,bf16-ro$SUFFIX}" 2>&1 | tee "$OUT/mfu_loop.txt"
cp benchmarks/out/train_loop.json "$OUT/extra/mfu_loop.json" 2>/dev/null
fi
# 3m-c. the shipped compiled model (since the sixteenth session the sums form) and the
# candidates against eager PyTorch on the GPU
# (tests/test_cuda.py::test_compiled_mfu_candidate_trains_like_eager_pytorch[shipped, pad8, gnoff, ck];
# test_padded_narrow_convolutions_match_on_the_gpu: eager cuDNN, float32 and bf16;
# test_compiled_dropout_with_functionalised_rng_draws_new_masks_each_step: -rng under CUDA
# graphs; ~100 s: MFU_TESTS_S=100)
if [ "${MFU_TESTS_S:-60}" != 0 ]; then
echo "== 3m. tests/test_cuda.py ($(left) s left)"
timeout "$(cap "${MFU_TESTS_S:-60}" 10)" python3 -m pytest -q -p no:cacheprovider -rf \
  tests/test_cuda.py -k "(mfu_candidate and (shipped or pad8 or gnoff or ck)) or padded_narrow or functionalised" 2>&1 | grep -v DEBUG | tail -15 \
  | tee "$OUT/mfu_tests.txt"
fi
echo "$BEST" > "$OUT/mfu_best.txt"
fi

if want mfuprof; then  # (~2-3 min; a second call right after part mfu, on the warm machine:
# PARTS=mfuprof MFU_VARIANT=<part mfu's fastest> GPU_BUDGET_S=<what is left>) where the
# compiled step's time goes now: kernels by kind, data-moving operators by shape
# (in the same call as part mfu, MFU_VARIANT defaults to its fastest; inductor's on-disk
# caches then make the recompile short)
[ -z "${MFU_VARIANT:-}" ] && [ -n "${BEST:-}" ] && MFU_VARIANT=$BEST
echo "== 3p. profile of ${MFU_VARIANT:=difflab} ($(left) s left)"
fresh profile_step.json
timeout "$(cap 600 5)" python3 benchmarks/profile_step.py "${MFU[@]}" --mode bf16-ro \
  --variant "$MFU_VARIANT" --iters 3 --top 30 --copies 2>&1 | tee "$OUT/mfu_profile.txt"
cp benchmarks/out/profile_step.json "$OUT/extra/mfu_profile.json" 2>/dev/null
fi

if want gncl; then  # (~3 min) why the compiled layout-keeping GroupNorm's gradients were wrong
# on an H100: the op alone, one ResnetBlock per form (aot_eager without inductor, the op's
# stored scale off, inductor's persistent / split reductions off), the U-Net per component
echo "== 3g. the layout-keeping GroupNorm's gradients, narrowed down ($(left) s left)"
timeout "$(cap "${GNCL_S:-240}" 20)" python3 -m pytest -q -p no:cacheprovider -rf \
  tests/test_cuda.py -k "gncl or layout_keeping" 2>&1 | grep -v DEBUG \
  | grep -E "^(FAILED|E  .*(assert|wrong))|passed|failed" | tee "$OUT/gncl_tests.txt"
fi

if want profile; then
echo "== 3. where the bf16 step goes: kernels by kind ($(left) s left)"
fresh profile_step.json
timeout "$(cap 90 5)" python3 benchmarks/profile_step.py --preset ddpm-cifar10 --batch 128 --device cuda \
  --mode bf16 --iters 3 --top 20 --cudnn-benchmark off,on 2>&1 | tee "$OUT/profile_step.txt"
cp benchmarks/out/profile_step.json "$OUT/extra/" 2>/dev/null
fi

if want loop; then
echo "== 4. difflab's whole training loop ($(left) s left)"
# With .before/src carried (an earlier difflab's src/, made here by
# `mkdir -p .before && git archive REV src | tar -x -C .before`, .before in
# .git/info/exclude and in carry): that loop first, then today's, same configs: the
# before/after of a change to the loop (the U-Net's code being the same, inductor's on-disk
# cache makes the second compile short). Eager bf16 is what `difflab train ddpm` runs on a GPU
# by default (-nchw: the same without channels_last, which PyTorch's eager CUDA GroupNorm
# copies to NCHW and back: eager NCHW was 8 % faster in the thirteenth session's bare step);
# -ro-w16 is --compile reduce-overhead --bf16-weights.
LOOP_CONFIGS=${LOOP_CONFIGS:-bf16,bf16-nchw,bf16-w16,bf16-ro-w16}
LOOP_ARGS=("${MFU[@]}" --steps "${LOOP_STEPS:-80}" --configs "$LOOP_CONFIGS")
if [ -d .before/src ]; then
  fresh train_loop.json
  PYTHONPATH="$PWD/.before/src:$PYTHONPATH" timeout "$(cap "${LOOP_BEFORE_S:-240}" 120)" \
    python3 benchmarks/train_loop.py "${LOOP_ARGS[@]}" 2>&1 | tee "$OUT/train_loop_before.txt"
  cp benchmarks/out/train_loop.json "$OUT/extra/train_loop_before.json" 2>/dev/null
fi
fresh train_loop.json
timeout "$(rest 60)" python3 benchmarks/train_loop.py "${LOOP_ARGS[@]}" 2>&1 \
  | tee "$OUT/train_loop.txt"
cp benchmarks/out/train_loop.json "$OUT/extra/" 2>/dev/null
fi

TESTS_PID=
if want tests; then  # the training tests with the loop on CUDA (sync-free guard, precisions,
  # deterministic kernels, resume); the whole log comes back, the tail is printed.
  # TESTS_K: a pytest -k expression, e.g. "not compiled" (tests/test_cuda.py's compiled
  # candidates take minutes; part mfu runs the ones that matter)
  run_tests() {
    timeout "$(rest 3)" python3 -m pytest -q -p no:cacheprovider -rf \
      tests/test_training_options.py tests/test_training.py tests/test_cuda.py \
      ${TESTS_K:+-k "$TESTS_K"} >"$OUT/tests_full.txt" 2>&1
    echo "== 5. training tests on the GPU: done ($(left) s left)"; tail -25 "$OUT/tests_full.txt"
  }
  echo "== 5. training tests on the GPU ($(left) s left)"
  if want race && [ -n "${TESTS_BESIDE_RACE:-}" ]; then run_tests & TESTS_PID=$!; else run_tests; fi
fi
if want race; then  # 6. equal-budget quality race, CPU budget replayed on the GPU
echo "== 6. quality race replayed: ${RACE_STEPS:=difflab=4841,diffusers=712,ddpm-pytorch=390} ($(left) s left)"
fresh quality_race.json
timeout "$(rest 5)" python3 benchmarks/quality_race.py --replay-steps "$RACE_STEPS" \
  --device cuda --n "${RACE_N:-5000}" --batch 500 --probe 8 --threads 4 \
  --peer-python "$(command -v python3)" --out-dir /tmp/race 2>&1 | tee "$OUT/quality_race.txt"
cp benchmarks/out/quality_race.json "$OUT/extra/" 2>/dev/null
cp /tmp/race/*-samples.png "$OUT/extra/" 2>/dev/null
# difflab's GPU-trained model (11 MB) comes back too, to be scored on the CPU beside the CPU
# seeds' models (RESULTS.md: its GPU score sits inside their spread; TF32 sampling costs ~6 %)
cp -r /tmp/race/difflab/model "$OUT/extra/difflab-model" 2>/dev/null
fi
[ -n "$TESTS_PID" ] && wait "$TESTS_PID"
tar czf "$OUT/extra.tgz" -C "$OUT" extra && rm -rf "$OUT/extra"
echo "done in $(( $(date +%s) - T0 )) s"
