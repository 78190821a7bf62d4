#!/usr/bin/env bash
# The GPU measurements in docs/benchmarks.md, as run on the device machine (one H200 or H100, no network).
# From the repo root, with the git-ignored folder `.whl2` carried:
#   .whl2/bundle.tar.xz   the missing Python packages, one archive (unsloth + unsloth_zoo 2026.10.9,
#                         bitsandbytes 0.50.2 with only its CUDA 13.0/CPU libraries, trl 1.15.0, datasets 4.8.5,
#                         dill, multiprocess, cut-cross-entropy, liger-kernel 0.8.5, platformdirs, gguf);
#                         built as docs/benchmarks.md "How they were run" says
#   .whl2/data/           ../shared/data/train/normalized/medical_o1_style_train.jsonl (the 205 shared rows)
#                         and ../shared/data/dev_pools/normalized/medqa_usmle_4opt_dev.jsonl (stage grpo)
#   .whl2/tokenizer/      the embedded SmolLM2 tokenizer files (the random model's tokenizer)
#   bash bench/device_session.sh "model fair4 fair16"      (stages, in order; BUDGET=seconds for all of them)
# The 8B model has RANDOM weights (bench/make_random_model.py): throughput and memory only, never quality.
set -u
OUT=${OUT:-/tmp/medcot_out}; LOGS=/tmp/medcot_logs; mkdir -p "$OUT" "$LOGS"
BUDGET=${BUDGET:-560}
SITE=/tmp/medcot_site
if [ -f .whl2/bundle.tar.xz ] && [ ! -d $SITE ]; then mkdir -p $SITE && tar xJf .whl2/bundle.tar.xz -C $SITE; fi
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false MEDCOT_HOME=/tmp/medcot_home
MODEL=/tmp/r1-8b-random DATA=.whl2/data/medical_o1_style_train.jsonl TOKENIZER=.whl2/tokenizer
COLS="--question-column question --reasoning-column reasoning --answer-column answer"
DAY=$(date +%F); GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | awk '{print tolower($2)}')
TAG=${DAY}_${GPU:-gpu}
left() { echo $(( BUDGET - SECONDS )); }
run() { local name=$1; shift; echo "=== $name (at ${SECONDS}s, $(left)s left)"; local t=$(left); [ $t -lt 20 ] && { echo "$name skipped: time budget"; return 0; }
        timeout -k 5 $t "$@" > "$LOGS/$name.log" 2>&1; local rc=$?
        echo "$name rc=$rc (at ${SECONDS}s)"
        grep -E "^(RESULT|step [0-9]+/|Run folder|Validation|Wall|Peak|tokens:|fast path|===)|Error|error" "$LOGS/$name.log" | cut -c1-300 | tail -12
        if [ $rc -ne 0 ]; then tail -20 "$LOGS/$name.log"; else tail -${TAIL:-6} "$LOGS/$name.log" | cut -c1-240; fi; return 0; }
# the fair comparison (issue 15): every Unsloth split of the 8-row step, medcot, plain TRL; U-best and medcot first
bench() {  # name quant stacks profile-stacks budget
  run "$1" python3 -m bench.train_throughput --model $MODEL --data $DATA $COLS --quant "$2" --stacks "$3" \
      --profile-stacks "$4" --steps ${STEPS:-12} --warmup ${WARMUP:-5} --timeout 240 --budget "$5" --min-stack-s 70 \
      --log-dir "$LOGS/$1" --out "$OUT/${TAG}_train_$1.json"; }
for stage in ${1:-model fair4}; do case $stage in
  env) { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 --version
         python3 -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|accelerate|triton) "; } | tee "$OUT/env.txt" ;;
  model) [ -f $MODEL/config.json ] || run make_model python3 -m bench.make_random_model $MODEL --tokenizer $TOKENIZER ;;
  fasttest) run fasttest python3 -m pytest -q -m gpu tests/test_fast.py -p no:cacheprovider ;;
  train) run train_r1_8b timeout 330 python3 -m medcot train --config configs/r1-distill-llama-8b.yaml \
           model.name_or_path=$MODEL data.source=$DATA data.question_column=question data.reasoning_column=reasoning \
           data.answer_column=answer data.val_size=16 train.report_to=none generate.max_new_tokens=48 \
           train.output_dir=/tmp/medcot_runs train.run_name=r1-8b-random-qlora
         for f in manifest.json metrics.jsonl; do cp /tmp/medcot_runs/r1-8b-random-qlora/$f "$OUT/${TAG}_medcot_train_4bit_$f"; done ;;
  fair4) bench 4bit 4bit "${STACKS4:-unsloth-8x1,medcot,unsloth-4x2,unsloth-2x4,plain,medcot-nockpt}" \
           "${PROFILE4:-medcot,unsloth-8x1}" $(( $(left) - ${RESERVE16:-0} )) ;;
  fair16) bench bf16 none "${STACKS16:-unsloth-8x1,medcot,unsloth-4x2,unsloth-2x4,plain}" "${PROFILE16:-}" $(( $(left) - ${RESERVEV:-0} )) ;;
  medcotv) run medcotv python3 -m bench.train_throughput --model $MODEL --data $DATA $COLS --quant 4bit \
           --stacks "${STACKS:-medcot-offload-mbt4096,medcot-offload-mbt2560}" --steps 10 --warmup 2 --timeout 200 \
           --budget $(left) --out "$OUT/${TAG}_train_4bit_medcot_variants.json" ;;
  multi4) run multi4 python3 -m bench.multi_gpu --model $MODEL --data $DATA --runs ${RUNS:-1:none,2:ddp,2:fsdp} \
           --steps 12 --warmup 3 --timeout 300 --out "$OUT/${TAG}_multi_gpu_4bit.json" train.optimizer=adamw ;;
  multi16) run multi16 python3 -m bench.multi_gpu --model $MODEL --data $DATA --runs ${RUNS:-1:none,2:ddp,2:fsdp} \
           --steps 12 --warmup 3 --timeout 300 --out "$OUT/${TAG}_multi_gpu_bf16.json" train.optimizer=adamw model.quantization=none ;;
  pretrain) run pretrain_r1_8b timeout 300 python3 -m medcot train --config configs/r1-distill-llama-8b.yaml --stage pretrain \
           model.name_or_path=$MODEL pretrain.block_size=2048 pretrain.max_steps=12 pretrain.val_docs=16 \
           train.report_to=none train.output_dir=/tmp/medcot_runs train.run_name=pretrain-8b-random
         for f in manifest.json metrics.jsonl; do cp /tmp/medcot_runs/pretrain-8b-random/pretrain/$f "$OUT/${TAG}_pretrain_4bit_$f"; done ;;
  evalbench) run evalbench python3 -m bench.eval_throughput --model $MODEL --dtype bf16 --source embedded \
           --num-prompts 16 --max-new-tokens 64 --batch-sizes 1,16 --fixed-length --out "$OUT/${TAG}_eval_throughput_bf16.json" ;;
  e2e) run eval_e2e python3 -m bench.eval_end_to_end --model $MODEL --source .whl2/data/eval --benchmarks medqa,medmcqa \
           --limit 512 --thinking-budget 1024 --batch-size 256 --override model.dtype=bf16 \
           --out "$OUT/${TAG}_eval_end_to_end_bf16.json" ;;
  serve) run serve_load python3 -m bench.serve_load --model $MODEL --device cuda --dtype bf16 --concurrency ${CLIENTS:-32} \
           --requests 96 --max-tokens 512 --no-offline --server-log "$LOGS/serve_server.log" \
           --out "$OUT/${TAG}_serve_load_bf16.json" ;;
  gen4bit) run gen4bit python3 -m bench.generate_throughput --model $MODEL --quant 4bit --lora 16 --single-new 512 \
           --concurrency 256 --new-tokens 256 --sweep "" --hf-single-new 32 --hf-batch 0 --gb-concurrency 0 --numerics \
           --budget-s 200 --out "$OUT/${TAG}_generate_qlora_4bit.json" ;;
  genmerged) run genmerged python3 -m bench.generate_throughput --model $MODEL --lora 16 --merge --single-new 512 \
           --concurrency 256 --new-tokens 256 --sweep "" --hf-single-new 0 --hf-batch 0 --gb-concurrency 0 --numerics \
           --budget-s 150 --out "$OUT/${TAG}_generate_lora_merged_bf16.json" ;;
  gputests) run gputests python3 -m pytest -q -m gpu -p no:cacheprovider ${GPU_TESTS:-tests/test_generate_gpu.py} ;;
  # GRPO (issue 18): medcot's stage vs TRL's GRPOTrainer (HF generate), 4 prompts x k=8 x 512 tokens; bf16 if time is left
  # (GRPO_QUANTS: which of "4bit none"; GRPO_STACKS4 / GRPO_STACKS16: the stacks of each, default medcot,trl).
  # GRPO_BUDGET (default 360 s) bounds the stage; each stack gets at most GRPO_STACK_S and stops after the step past
  # which the next would not fit, keeping what it measured.
  grpo) GB=$(left); [ $GB -gt ${GRPO_BUDGET:-360} ] && GB=${GRPO_BUDGET:-360}; G0=$SECONDS
        for q in ${GRPO_QUANTS:-4bit none}; do GL=$(( GB - (SECONDS - G0) )); [ $GL -lt 90 ] && { echo "grpo $q skipped: ${GL}s left"; continue; }
          run grpo_$q python3 -m bench.grpo_throughput --model $MODEL --items .whl2/data/medqa_usmle_4opt_dev.jsonl \
              --quant $q --stacks $([ $q = none ] && echo ${GRPO_STACKS16:-medcot,trl} || echo ${GRPO_STACKS4:-medcot,trl}) --steps ${GRPO_STEPS:-3} --warmup 1 --budget $GL --timeout ${GRPO_STACK_S:-240} \
              --min-stack-s 75 --log-dir "$LOGS/grpo_$q" --out "$OUT/${TAG}_grpo_${q/none/bf16}.json"; done ;;
  doctor) python3 -m medcot doctor --config configs/r1-distill-llama-8b.yaml > "$OUT/${TAG}_doctor.txt" 2>&1; cat "$OUT/${TAG}_doctor.txt" ;;
esac; done
# Per-stage and per-stack logs travel back as one archive (the device returns at most 8 files).
tar czf "$OUT/${TAG}_logs.tar.gz" -C "$LOGS" . 2>/dev/null
echo "total ${SECONDS}s"; ls -la "$OUT"
