#!/usr/bin/env bash
# Runs every command of docs/guide.md "Multi-host setup" on this one machine, with tiny overrides:
# an `mlflow server` (SQLite, served artifacts), a Ray head and a worker node with token auth on,
# and one `ray job submit` per job (MGG, CTA, both Tune searches, an evaluation worker). Then it
# records which TCP ports this cluster's processes listen on, and on which addresses.
#
#   scripts/cluster_smoke.sh [WORK_DIR]     # tests/test_cluster_smoke.py runs it (slow suite)
#
# Ports default to the guide's (5000, 6379, 8265, 52365); MLFLOW_PORT, RAY_PORT, DASHBOARD_PORT,
# AGENT_PORT override them (the test picks free ones). It never runs `ray stop`, which would stop
# every Ray on the machine: at exit it ends only the processes of its own cluster (those whose
# command line names its WORK_DIR) and its mlflow server.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d /tmp/cluster_smoke.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
MLFLOW_PORT=${MLFLOW_PORT:-5000}
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
AGENT_PORT=${AGENT_PORT:-52365}  # the head's dashboard agent, which the job API needs; any other Ray here holds 52365
cd "$REPO"
if [ -x .venv/bin/activate ] || [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi
PY=$(command -v python)
echo "smoke: work dir $WORK, python $PY"

cleanup() {
    "$PY" "$REPO/scripts/cluster_procs.py" stop "$WORK" || true
    if [ -n "${MLFLOW_PID:-}" ]; then kill "$MLFLOW_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT

# A tiny source model: the guide's jobs train or find one from configs/fmnist_c/source.yaml.
SRC="$WORK/resnet.pt"
"$PY" - "$SRC" <<'EOF'
import sys, torch
from metatta.models import build_model
from metatta.models.checkpoint import save_checkpoint
from metatta.models.feature_stats import compute_feature_stats
torch.manual_seed(0)
m = build_model("resnet_fmnist", num_classes=10, in_channels=1)
save_checkpoint(sys.argv[1], m, model_name="resnet_fmnist", num_classes=10, in_channels=1, dataset="fashion_mnist",
                feature_stats=compute_feature_stats(m, torch.rand(64, 1, 28, 28)))
EOF

# ---- 1. MLflow server: SQLite backend, artifacts served over HTTP ---------------------------------
mkdir -p "$WORK/mlflow"
mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$WORK/mlflow/mlflow.db" \
    --serve-artifacts --artifacts-destination "$WORK/mlflow/artifacts" > "$WORK/mlflow_server.log" 2>&1 &
MLFLOW_PID=$!
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
for _ in $(seq 240); do
    "$PY" -c "import urllib.request as u; u.urlopen('$MLFLOW_TRACKING_URI/health', timeout=2)" 2>/dev/null && break
    kill -0 "$MLFLOW_PID" || { cat "$WORK/mlflow_server.log"; exit 1; }
    sleep 0.5
done

# ---- 2. Ray head and worker node, token auth on ---------------------------------------------------
# `ray get-auth-token --generate` writes ~/.ray/auth_token; here it goes to the work dir, not this
# machine's home (RAY_AUTH_TOKEN_PATH tells every ray command where it is).
HOME="$WORK/home" ray get-auth-token --generate > /dev/null
export RAY_AUTH_TOKEN_PATH="$WORK/home/.ray/auth_token"
export RAY_AUTH_MODE=token
ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 --port "$RAY_PORT" \
    --dashboard-port "$DASHBOARD_PORT" --dashboard-agent-listen-port "$AGENT_PORT" \
    --temp-dir "$WORK/ray" --num-cpus 2 --disable-usage-stats
# the worker node (on another host: the same command with its own --node-ip-address). On this one
# machine it needs its own --temp-dir: two nodes sharing one would unpack each job's working
# directory into the same folder, under each other's feet.
ray start --address "127.0.0.1:$RAY_PORT" --node-ip-address 127.0.0.1 --num-cpus 2 \
    --temp-dir "$WORK/ray_worker" --dashboard-agent-listen-port 0 --disable-usage-stats

"$PY" "$REPO/scripts/cluster_procs.py" ports "$WORK" "$MLFLOW_PID" > "$WORK/ports_started.json"
cat "$WORK/ports_started.json"

export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
# The job API takes jobs once the head's dashboard agent is up ("No available agent to submit
# job" before that), which on a loaded machine is a while after `ray start` returns.
for _ in $(seq 90); do ray job submit -- true > /dev/null 2>&1 && break; sleep 2; done
ENV='{"env_vars": {"MLFLOW_TRACKING_URI": "'$MLFLOW_TRACKING_URI'"}}'
OUT=$WORK/outputs
TINY_DATA="benchmark.num_images=16 stream.batch_size=8 device=cpu"

# ---- 3. one job each --------------------------------------------------------------------------------
ray job submit --working-dir . --runtime-env-json "$ENV" -- python launch/train_mgg.py \
    --config configs/fmnist_c/mgg.yaml checkpoint_dir=$OUT/mgg \
    source_checkpoint=$SRC train_images=32 val_images=8 batch_size=2 epochs=1 unroll_steps=1 \
    val_batch_size=8 device=cpu
ray job submit --working-dir . --runtime-env-json "$ENV" -- python launch/train_cta.py \
    --config configs/fmnist_c/cta.yaml checkpoint_dir=$OUT/cta \
    source_checkpoint=$SRC train_images=64 simclr.epochs=1 simclr.batch_size=32 align.epochs=1 \
    align.batch_size=32 val_images=16 val_batch_size=16 device=cpu
ray job submit --working-dir . --runtime-env-json "$ENV" -- python launch/tune.py \
    --config configs/fmnist_c/tune_palm.yaml output_dir=$OUT \
    source.checkpoint=$SRC num_samples=2 report_every=1 $TINY_DATA
ray job submit --working-dir . --runtime-env-json "$ENV" -- python launch/tune_nanoadapt.py \
    --config configs/fmnist_c/tune_nanoadapt.yaml output_dir=$OUT \
    source.checkpoint=$SRC num_samples=2 report_every=4 'batch_sizes=[4]' $TINY_DATA
ray job submit --working-dir . --runtime-env-json "$ENV" -- python launch/eval_worker.py \
    --config configs/fmnist_c/mgtta.yaml output_dir=$OUT --model mgg --claims ray --once \
    source.checkpoint=$SRC 'benchmark.corruptions=[gaussian_noise]' $TINY_DATA

# measured again while the jobs' workers are still up (Ray keeps idle workers a while)
"$PY" "$REPO/scripts/cluster_procs.py" ports "$WORK" "$MLFLOW_PID" > "$WORK/ports_after_jobs.json"

"$PY" - <<'EOF'
from metatta import tracking
c = tracking.client()
for name in ("mgg", "cta", "palm_settings", "nanoadapt_settings_n4"):
    print(f"registered {name}: champion v{tracking.resolve_version(f'models:/{name}@champion')}")
print("mgg v1 evaluation:", c.get_model_version("mgg", "1").tags.get("evaluation"))
EOF
echo "smoke: all commands ran"
