#!/usr/bin/env bash
# iLoRA vs LLaRA's LoRA at the paper's scale, on a GPU pod: Llama-2-7B, full epochs, official hyper-parameters.
#
#   scripts/ilora_full_scale.sh PATH/TO/Llama-2-7b-hf [lastfm|ml100k] [extra key=value overrides...]
#
# PATH/TO/Llama-2-7b-hf is a local Hugging Face directory (config.json, *.safetensors, tokenizer files);
# nothing is downloaded. Steps (each resumes if rerun after a preemption: jaxrec resumes from its checkpoints):
#   0. (ml100k) build the LLaRA-style MovieLens files from ../shared/data/ml-100k (or set ML100K_SOURCE)
#   1. the frozen SASRec guide: 64-d, 1 block, 1 head, length 10, 20 epochs on the train rows
#   2. iLoRA: 4 experts x rank 2 (scale 16) on q,k,v,o,gate,up,down of all 32 layers, ResNet router,
#      hybrid prompts + curriculum, 5 epochs of 128 = 16 micro-batches of 8, Adam lr 7e-4 (LastFM) / 8e-4
#      (MovieLens), router 0.3x, warm-up max_steps/20 then cosine to lr/100, validation by generation each epoch
#   3. LLaRA's LoRA: the same with one expert of rank 8 (scale 4), same data order and seed
#   4. the test tables (ValidRatio, HR@1 official and over all, likelihood ranking) of both, plus the SASRec
#      and untuned-Llama rows, written to runs/<name>/evaluate-step*.json
#
# Expected cost on one H100 (bf16): ~1,870 steps x 128 examples x ~350 tokens per run; budget a few hours per
# run. More GPUs: the batch is split data-parallel over all local devices (mesh.data=-1), nothing to change.
# Multi-host: set distributed.initialize=yes and start the same command on every host.
set -euo pipefail

BASE=${1:?usage: scripts/ilora_full_scale.sh PATH/TO/Llama-2-7b-hf [lastfm|ml100k] [overrides...]}
DATASET=${2:-lastfm}
shift $(( $# >= 2 ? 2 : 1 ))
EXTRA=("$@")
cd "$(dirname "$0")/.."

if ! python -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" 2>/dev/null; then
  echo "no GPU backend for JAX: pip install -U 'jax[cuda12]' (then rerun)" >&2
  exit 1
fi
[ -f "$BASE/config.json" ] || { echo "$BASE: not a Hugging Face checkpoint directory (no config.json)" >&2; exit 1; }

case "$DATASET" in
  lastfm) GUIDE_CONFIG=configs/ilora/sasrec_lastfm.yaml; CONFIG=configs/ilora/lastfm_llama2_7b.yaml ;;
  ml100k)
    GUIDE_CONFIG=configs/ilora/sasrec_ml100k.yaml; CONFIG=configs/ilora/ml100k_llama2_7b.yaml
    [ -f data/ml100k-llara/train.tsv ] || \
      python -m jaxrec.methods.ilora.movielens "${ML100K_SOURCE:-../shared/data/ml-100k}" data/ml100k-llara ;;
  *) echo "unknown dataset $DATASET (lastfm | ml100k)" >&2; exit 1 ;;
esac

echo "== 1. SASRec guide ($GUIDE_CONFIG)"
jaxrec train "$GUIDE_CONFIG" train.progress=false

NAME=$(python -c "from jaxrec.config import load_config; print(load_config('$CONFIG').run.name)")
echo "== 2. iLoRA ($CONFIG -> runs/$NAME)"
jaxrec train "$CONFIG" "model.base_model=$BASE" "${EXTRA[@]}"

echo "== 3. LLaRA LoRA (one expert of rank 8 -> runs/$NAME-lora)"
jaxrec train "$CONFIG" "model.base_model=$BASE" model.experts=1 "run.name=$NAME-lora" \
  "model.report_baselines=[]" "${EXTRA[@]}"

echo "== 4. test tables"
jaxrec evaluate "runs/$NAME"
jaxrec evaluate "runs/$NAME-lora"
