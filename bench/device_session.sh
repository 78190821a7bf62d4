#!/usr/bin/env bash
# The GPU measurements in docs/benchmarks.md, as run on the device machine (one H100 80GB, no network).
# From the repo root, with the carried folders `.whl2` (wheels: bitsandbytes, liger-kernel, trl, datasets,
# unsloth, pytest, platformdirs) and `.bench` (the shared training rows and the embedded tokenizer):
#   bash bench/device_session.sh "model fasttest train bench4"      (stages, in order)
# The 8B model has RANDOM weights (bench/make_random_model.py): throughput and memory only, never quality.
set -u
OUT=${OUT:-/tmp/medcot_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/.whl2/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false MEDCOT_HOME=/tmp/medcot_home
MODEL=/tmp/r1-8b-random DATA=.bench/data/medical_o1_style_train.jsonl
COLS="--question-column question --reasoning-column reasoning --answer-column answer"
run() { local name=$1; shift; echo "=== $name (at ${SECONDS}s)"; "$@" > "$OUT/$name.log" 2>&1; local rc=$?
        echo "$name rc=$rc (at ${SECONDS}s)"; grep -E "^(RESULT|step [0-9]+/|Run folder|Validation|Wall|Peak|tokens:|fast path)|Error|error" "$OUT/$name.log" | tail -8; \
        [ $rc -ne 0 ] && tail -20 "$OUT/$name.log"; return 0; }
for stage in ${1:-model fasttest train bench4}; do case $stage in
  env) { nvidia-smi --query-gpu=name,memory.total --format=csv; python3 -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|accelerate|triton|pyyaml|tqdm|matplotlib|platformdirs) "; } | tee "$OUT/env.txt" ;;
  model) [ -f $MODEL/config.json ] || run make_model python3 bench/make_random_model.py $MODEL --tokenizer .bench/tokenizer ;;
  fasttest) run fasttest python3 -m pytest -q -m gpu tests/test_fast.py -p no:cacheprovider ;;
  train) run train_r1_8b timeout 330 python3 -m medcot train --config configs/r1-distill-llama-8b.yaml \
           model.name_or_path=$MODEL data.source=$DATA data.question_column=question data.reasoning_column=reasoning \
           data.answer_column=answer data.val_size=16 train.report_to=none generate.max_new_tokens=48 \
           train.output_dir=$OUT/runs train.run_name=r1-8b-random-qlora
         cp $OUT/runs/r1-8b-random-qlora/{manifest.json,metrics.jsonl,report.md} $OUT/ 2>/dev/null; rm -rf $OUT/runs ;;
  bench4) run bench4 python3 bench/train_throughput.py --model $MODEL --data $DATA $COLS --quant 4bit \
           --stacks ${STACKS4:-plain,medcot,unsloth} --steps 10 --warmup 2 --timeout 240 --out $OUT/train_4bit.json ;;
  bench4v) run bench4v python3 bench/train_throughput.py --model $MODEL --data $DATA $COLS --quant 4bit \
           --stacks medcot --micro-batch-tokens ${MBT:-4096} --checkpoint-ratio ${CKR:-1.0} --steps 10 --warmup 2 \
           --timeout 200 --out $OUT/train_4bit_mbt${MBT:-4096}_ckr${CKR:-1.0}.json ;;
  bench16) run bench16 python3 bench/train_throughput.py --model $MODEL --data $DATA $COLS --quant none \
           --stacks ${STACKS16:-plain,medcot,unsloth} --steps 10 --warmup 2 --timeout 200 --out $OUT/train_bf16.json ;;
  multi4) run multi4 python3 bench/multi_gpu.py --model $MODEL --data $DATA --runs ${RUNS:-1:none,2:ddp,2:fsdp} \
           --steps 12 --warmup 3 --timeout 300 --out $OUT/multi_gpu_4bit.json train.optimizer=adamw ;;
  multi16) run multi16 python3 bench/multi_gpu.py --model $MODEL --data $DATA --runs ${RUNS:-1:none,2:ddp,2:fsdp} \
           --steps 12 --warmup 3 --timeout 300 --out $OUT/multi_gpu_bf16.json train.optimizer=adamw model.quantization=none ;;
  pretrain) run pretrain_r1_8b timeout 300 python3 -m medcot train --config configs/r1-distill-llama-8b.yaml --stage pretrain \
           model.name_or_path=$MODEL pretrain.block_size=2048 pretrain.max_steps=12 pretrain.val_docs=16 \
           train.report_to=none train.output_dir=$OUT/runs train.run_name=pretrain-8b-random
         cp $OUT/runs/pretrain-8b-random/pretrain/{manifest.json,metrics.jsonl,report.md} $OUT/ 2>/dev/null
         for f in manifest.json metrics.jsonl report.md; do mv $OUT/$f $OUT/pretrain_$f 2>/dev/null; done; rm -rf $OUT/runs ;;
  evalbench) run evalbench python3 bench/eval_throughput.py --model $MODEL --dtype bf16 --source embedded \
           --num-prompts 16 --max-new-tokens 64 --batch-sizes 1,16 --fixed-length --out $OUT/eval_throughput.json ;;
  doctor) [ -f medcot/doctor.py ] && python3 -m medcot doctor --config configs/r1-distill-llama-8b.yaml > $OUT/doctor_gpu.txt 2>&1; cat $OUT/doctor_gpu.txt ;;
esac; done
echo "total ${SECONDS}s"
