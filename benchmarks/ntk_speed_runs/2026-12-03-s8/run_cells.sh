#!/bin/bash
# Every issue-16 cell on a fifth CPU model (AMD EPYC family 26, 2 cores,
# AVX-512), the sixth session's commands (../2026-12-02-s6/run_all.sh and
# run_cells.sh), small cells first. Resumable: a run whose JSON exists is skipped.
cd "$(dirname "$0")/../../.." || exit 1
D=benchmarks/ntk_speed_runs/2026-12-03-s8
export PYTHONPATH=$PWD
S="python benchmarks/ntk_speed.py --generic --reference --workloads '' --modes full,trace --repeats 9"
G="python benchmarks/ntk_speed.py --generic --reference --workloads '' --modes full,trace --generic-sizes full --generic-impls auto,structured --repeats 5"
B="python benchmarks/ntk_speed.py --impls auto,structured,model.apply --reference --repeats 3 --full-order interleaved"
run() { name=$1; shift; echo "== $name: $* $(date +%T)"; [ -f $D/$name.json ] || eval "$@ --json $D/$name.json" > $D/$name.log 2>&1; echo "rc=$? $(date +%T)"; }
run gi "$S"
run gb "$S --generic-order blocked"
run gfull_cnn "python benchmarks/ntk_speed.py --generic --reference --workloads '' --modes full,trace --generic-sizes full --generic-workloads cnn2d --generic-impls structured --nt-impls nt-structured --repeats 5"
run gfull_mlp "$G --generic-workloads mlp784 --nt-impls nt-structured"
run f_mlp "$B --workloads mlp --nt-impls nt-structured"
run f_l5 "$B --workloads lenet5 --nt-impls nt-structured,nt-jacobian"
run f_c1t "$B --workloads cnn1d --modes trace --nt-impls nt-structured,nt-jacobian"
run f_c1f "$B --workloads cnn1d --modes full --nt-impls nt-jacobian"
run f_r20 "$B --workloads resnet20 --nt-impls nt-structured,nt-jacobian"
# Then where four small or Gram-bound kernels' time goes on this CPU (ntk_phases.py;
# phases.log / phases.json are appended to).
P="python benchmarks/ntk_phases.py --json $D/phases.json"
ph() { echo "== phases $* $(date +%T)"; $P "$@" >> $D/phases.log 2>&1; }
ph cnn2d 500 full --reference-json $D/gfull_cnn.json
ph cnn2d 500 trace --reference-json $D/gfull_cnn.json
ph cnn2d 64 trace --repeats 9 --reference-json $D/gi.json
ph mlp784 128 trace --repeats 9 --reference-json $D/gi.json
echo "done $(date +%T)"
