#!/bin/bash
# GPU checks in one go on a bare GPU host whose python3 has torch and cuda-python (such as a
# lent device machine): wheels of the other dependencies and of shmserve in .whl/, then the
# gpu tests, the torch tests, the CUDA identity bench and a device-to-host copy probe; logs
# and results go to $OUT. Stages: all (default), tests, bench, d2h.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $PWD/.whl/*.whl || exit 3
REPO=$PWD
# An editable-like layout: shmserve.<folder> resolves to the checkout's folders whichever
# sys.path entry finds shmserve first (the installed dist-info keeps the entry points).
for d in daemon workers client protos repoagents tests systemd; do ln -sfn ../$d shmserve/$d; done
rm -rf /tmp/site/shmserve && ln -s $REPO/shmserve /tmp/site/shmserve
# /tmp/site first: the checkout's root package shmserve/ must not shadow the installed one.
export PYTHONPATH=/tmp/site:$REPO PYTHONUNBUFFERED=1
cd /tmp
STAGE=${1:-all}
{ date; nvidia-smi -L; nproc; uname -r; ls /proc/driver/nvidia/gpus
  python3 -c "import sys,torch,grpc,google.protobuf as p,numpy,onnxruntime as o; print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.is_available(), 'grpc', grpc.__version__, 'pb', p.__version__, 'np', numpy.__version__, 'ort', o.__version__, o.get_available_providers())"
  python3 -c "import cuda.bindings, tritonclient.utils.cuda_shared_memory as c; print('cuda-bindings', cuda.bindings.__version__)"
} > $OUT/facts.txt 2>&1
cat $OUT/facts.txt
if [ "$STAGE" = all ] || [ "$STAGE" = tests ]; then
  timeout ${TESTS_S:-230} python3 -m pytest -p no:cacheprovider -q --timeout 60 ${TESTS:-$REPO/tests/test_gpu.py $REPO/tests/test_pytorch_backend.py $REPO/tests/test_onnx_backend.py::test_gpu_instance_runs_on_the_cuda_provider} --junitxml=$OUT/tests.xml > $OUT/tests.log 2>&1
  echo "tests rc=$?"; tail -40 $OUT/tests.log
fi
if [ "$STAGE" = all ] || [ "$STAGE" = bench ]; then
  timeout ${BENCH_S:-150} python3 -m bench --only identity --duration 1 --warmup 0.3 --no-plots --out $OUT > $OUT/bench.log 2>&1
  echo "bench rc=$?"; tail -45 $OUT/bench.log
fi
ls /dev/shm | head
if [ "$STAGE" = all ] || [ "$STAGE" = d2h ]; then
  timeout 60 python3 $REPO/bench/gpu/d2h.py 2>&1 | tee $OUT/d2h.txt
fi
if [ "$STAGE" = frontends ]; then
  # perf_analyzer's binary in .pa/ (from the perf_analyzer wheel); no Triton on such a host.
  export PERF_ANALYZER=$REPO/.pa/perf_analyzer
  $PERF_ANALYZER --help > /dev/null 2>&1; echo "perf_analyzer rc=$?"
  timeout ${FE_S:-200} python3 -m bench.frontends --quick --no-triton --frontends 1 2 4 8 \
    --concurrency 8 64 --duration ${FE_WINDOW:-1.5} --json $OUT/frontends.json > $OUT/frontends.log 2>&1
  echo "frontends rc=$?"; tail -32 $OUT/frontends.log
fi
