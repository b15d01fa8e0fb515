#!/bin/bash
# The sixth session's runs: where each kernel's time goes (ntk_phases.py), against
# neural-tangents' best from a fresh 2-D CNN run (gfull_cnn) and the fifth session's
# runs on the same CPU model (../2026-12-02-s5). Resumable: gfull_cnn runs only once;
# phases.log / phases.json are appended to (remove them to start over).
cd "$(dirname "$0")/../../.." || exit 1
D=benchmarks/ntk_speed_runs/2026-12-02-s6
S5=benchmarks/ntk_speed_runs/2026-12-02-s5
export PYTHONPATH=$PWD
echo "== gfull_cnn $(date +%T)"
[ -f $D/gfull_cnn.json ] || python benchmarks/ntk_speed.py --generic --reference --workloads '' --modes full,trace \
  --generic-sizes full --generic-workloads cnn2d --generic-impls structured \
  --nt-impls nt-structured --repeats 5 --json $D/gfull_cnn.json > $D/gfull_cnn.log 2>&1
P="python benchmarks/ntk_phases.py --json $D/phases.json"
ph() { echo "== $* $(date +%T)"; $P "$@" >> $D/phases.log 2>&1; }
for m in full trace; do
  ph cnn2d 500 $m --reference-json $D/gfull_cnn.json
  ph cnn2d 64 $m --repeats 9 --reference-json $S5/gi.json
  ph mlp784 128 $m --repeats 9 --reference-json $S5/gi.json
  ph mlp784 1000 $m --reference-json $S5/gfull_mlp.json
  ph lenet5 500 $m --reference-json $S5/f_l5.json
  ph mlp 1000 $m --reference-json $S5/f_mlp.json
done
ph cnn1d 1000 trace --reference-json $S5/f_c1t.json
ph cnn1d 1000 full --repeats 2 --reference-json $S5/f_c1f.json
ph resnet20 256 trace --repeats 2 --reference-json $S5/f_r20.json
ph resnet20 256 full --repeats 2 --reference-json $S5/f_r20.json
echo "done $(date +%T)"
