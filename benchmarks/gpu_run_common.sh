# Sourced by the benchmarks' gpu_run.sh scripts (device calls of under ten minutes, output under $OUT).
run() {  # SECONDS COMMAND...: the command's last lines (TAIL, default 14), stopped at SECONDS
  local limit=$1
  shift
  timeout "$limit" "$@" 2>&1 | grep -v -i warning | tail -"${TAIL:-14}"
}
