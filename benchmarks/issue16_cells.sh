#!/bin/bash
# Every issue-16 cell in one chain, small cells first, then where four small or
# Gram-bound kernels' time goes (ntk_phases.py), then the per-cell ranges
# (issue16_summary.py -> summary.txt). The eighth session's run_cells.sh, for any
# output folder. Needs the neural-tangents venv (ntk_speed.py --reference builds it).
# Resumable: a run whose JSON exists is skipped; phases.log / phases.json are
# appended to (remove them to start over).
#
#   bash benchmarks/issue16_cells.sh benchmarks/ntk_speed_runs/$(date +%F)-NAME
set -u
D=${1:?usage: bash benchmarks/issue16_cells.sh OUTPUT_FOLDER}
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$D"
export PYTHONPATH=$PWD
S="python benchmarks/ntk_speed.py --generic --reference --workloads '' --modes full,trace --repeats 9"
G="python benchmarks/ntk_speed.py --generic --reference --workloads '' --modes full,trace --generic-sizes full --repeats 5"
B="python benchmarks/ntk_speed.py --impls auto,structured,model.apply --reference --repeats 3 --full-order interleaved"
run() {
  name=$1; shift; echo "== $name: $* $(date +%T)"
  [ -f "$D/$name.json" ] || eval "$@ --json $D/$name.json" > "$D/$name.log" 2>&1
  echo "rc=$? $(date +%T)"
}
run gi "$S"
run gb "$S --generic-order blocked"
run gfull_cnn "$G --generic-workloads cnn2d --generic-impls structured --nt-impls nt-structured"
run gfull_mlp "$G --generic-workloads mlp784 --generic-impls auto,structured --nt-impls nt-structured"
run f_mlp "$B --workloads mlp --nt-impls nt-structured"
run f_l5 "$B --workloads lenet5 --nt-impls nt-structured,nt-jacobian"
run f_c1t "$B --workloads cnn1d --modes trace --nt-impls nt-structured,nt-jacobian"
run f_c1f "$B --workloads cnn1d --modes full --nt-impls nt-jacobian"
run f_r20 "$B --workloads resnet20 --nt-impls nt-structured,nt-jacobian"
P="python benchmarks/ntk_phases.py --json $D/phases.json"
ph() { echo "== phases $* $(date +%T)"; $P "$@" >> "$D/phases.log" 2>&1; }
ph cnn2d 500 full --reference-json "$D/gfull_cnn.json"
ph cnn2d 500 trace --reference-json "$D/gfull_cnn.json"
ph cnn2d 64 trace --repeats 9 --reference-json "$D/gi.json"
ph mlp784 128 trace --repeats 9 --reference-json "$D/gi.json"
python benchmarks/issue16_summary.py "$D" > "$D/summary.txt"
echo "done $(date +%T)"
