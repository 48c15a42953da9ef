#!/usr/bin/env bash
# The README's deployment walkthrough as one script: a SuperLink and three SuperNodes on this
# machine, with TLS and SuperNode authentication, running examples/deployment/config.yaml.
# Each `start ...` line is what you would type in its own terminal (on its own machine).
#
#   bash examples/deployment/walkthrough.sh          (from the repository root, in the venv)
set -euo pipefail
WORK=${WORK:-runs/deployment-walkthrough}
PORT=${PORT:-9093}
mkdir -p "$WORK"
export FLWR_HOME="$PWD/$WORK/flwr-home"  # Flower's files for this walkthrough (instead of ~/.flwr)
mkdir -p "$FLWR_HOME"
PIDS=()
start() {  # start NAME COMMAND...: a role in the background, in its own process group, logging to $WORK/NAME.log
  local name=$1; shift
  setsid "$@" > "$WORK/$name.log" 2>&1 &
  PIDS+=($!)
}
cleanup() { for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

# 1. Data: three organisations' files and the server's validation set
python examples/deployment/prepare_data.py --out data/deployment

# 2. A CA, the SuperLink's certificate, and one authentication key pair per SuperNode
fedlm certs "$WORK/certs" --host 127.0.0.1 --host localhost --node clinic-a --node clinic-b --node clinic-c

# 3. The SuperLink (TLS on; only registered SuperNodes may connect)
start superlink flower-superlink \
  --ssl-ca-certfile "$WORK/certs/ca.crt" --ssl-certfile "$WORK/certs/server.pem" --ssl-keyfile "$WORK/certs/server.key" \
  --host 127.0.0.1 --port "$PORT" --enable-supernode-auth --disable-runtime-dependency-installation
until python -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 1)" 2>/dev/null; do sleep 0.5; done

# 4. Register each SuperNode's public key with the SuperLink (the Flower CLI reads $FLWR_HOME/config.toml)
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "walkthrough"

[superlink.walkthrough]
address = "127.0.0.1:$PORT"
root-certificates = "$PWD/$WORK/certs/ca.crt"
TOML
for node in clinic-a clinic-b clinic-c; do flwr supernode register "$WORK/certs/$node.pub"; done

# 5. One SuperNode per organisation, each with only its own data
for node in clinic-a clinic-b clinic-c; do
  start "$node" flower-supernode --superlink "127.0.0.1:$PORT" --root-certificates "$WORK/certs/ca.crt" \
    --auth-supernode-private-key "$WORK/certs/$node.key" --port "$((PORT + 10 + ${#PIDS[@]}))" \
    --node-config "dataset='data/deployment/$node.csv'"
done

# 6. The run: the same config a simulation uses
fedlm run examples/deployment/config.yaml --backend flower \
  --superlink "127.0.0.1:$PORT" --root-certificates "$WORK/certs/ca.crt"
