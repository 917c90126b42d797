#!/bin/bash
cd /work/pool-v3
while pgrep -f queue.sh > /dev/null; do sleep 10; done
PY=/work/main/.venv/bin/python
$PY benchmarks/mini8_table.py --threads 2 ties dare consensus iso_c iso_cts pcb "dare ++method.tune=null" \
  "della ++method.tune=null" "consensus ++method.tune=null" "lines ++method.tune=null" "iso_c ++method.tune=null" \
  "iso_cts ++method.tune=null" "pcb ++method.tune=null" "task_arithmetic ++method.tune=null" wemoe sparse_wemoe smear \
  concrete_task_arithmetic concrete_adamerging_layer_wise concrete_adamerging_task_wise \
  "wemoe method/init=task_arithmetic" "concrete_task_arithmetic method/init=task_arithmetic" \
  "concrete_adamerging_layer_wise method/init=task_arithmetic"
$PY benchmarks/mini8_table.py --threads 2 "adamerging_layer_wise ++method.model.clamp=[0,1] ++method.optimizer.lr=0.01" \
  "adamerging_layer_wise ++method.optimizer.lr=0.01" "adamerging_layer_wise ++method.model.clamp=[0,1]"
