#!/usr/bin/env bash
# CoFiRec vs TIGER on Amazon Beauty at the papers' scale, on one accelerator (or a pod).
#
#   scripts/cofirec_full_scale.sh PATH/TO/amazon/Beauty [EMBEDDING_MODEL] [extra generator key=value overrides...]
#
# PATH/TO/amazon/Beauty holds Beauty.txt, item_text.json and letter_Beauty.index.json. EMBEDDING_MODEL is any
# Llama-family checkpoint jaxrec loads (HF directory or .gguf; default: the packaged SmolLM2-135M, "smollm2");
# LETTER used LLaMA-7B. Nothing is downloaded. Every step resumes if rerun after a preemption.
#   1. text embeddings of the three levels (category path, brand + leaf category, title), cached in runs/embeddings
#   2. the CF level: SASRec with 32-d items on the training events only (configs/cofirec/cf_guide_beauty.yaml)
#   3. tokenizers, LETTER's budget: 20k steps of 1,024 items, AdamW 1e-3 (wd 1e-4), k-means init,
#      CoFiRec = per-level codebooks (min(256, distinct) / 256 / 256 / 256), TIGER = RQ-VAE 3 x 256 + dedup
#   4. generators, LETTER's T5 (d 128, 4 + 4 layers, 6 heads x 64, d_ff 1024, dropout 0.1), 200 epochs of batch
#      512 (LETTER: 256 per device x 2 GPUs), lr 5e-4 cosine, warm-up 1%, weight decay 0.01, beam 20:
#      CoFiRec codes, TIGER codes, and LETTER's released codes (a tokenizer-independent check)
#   5. the test tables (R@5/10, N@5/10, ValidRatio, duplicate rate, beam-vs-exact disagreement) in
#      runs/<name>/evaluate-step*.json
# Cost on one H100, estimated from the CPU runs' per-token cost: ~131k prefixes x 200 epochs ~ 51k steps of 512;
# budget an hour or two per generator. More devices: the batch splits data-parallel (mesh.data=-1).
set -euo pipefail

DATA=${1:?usage: scripts/cofirec_full_scale.sh PATH/TO/amazon/Beauty [EMBEDDING_MODEL] [overrides...]}
MODEL=${2:-smollm2}
shift $(( $# >= 2 ? 2 : 1 ))
EXTRA=("$@")
cd "$(dirname "$0")/.."

if ! python -c "import jax, sys; sys.exit(0 if jax.default_backend() in ('gpu', 'tpu') else 1)" 2>/dev/null; then
  echo "no accelerator backend for JAX: pip install -U 'jax[cuda12]' (then rerun)" >&2
  exit 1
fi
for f in Beauty.txt item_text.json letter_Beauty.index.json; do
  [ -f "$DATA/$f" ] || { echo "$DATA/$f: missing" >&2; exit 1; }
done
D=(data.source="$DATA/Beauty.txt")
TEXT=(model.text="$DATA/item_text.json" model.embeddings="$MODEL")
GEN=(train.epochs=200 train.batch_size=512 train.warmup_steps=500 train.eval_every=5000 checkpoint.every=5000
     model.exact_users=1000 eval.batch_size=2048)

echo "== 2. CF guide"
jaxrec train configs/cofirec/cf_guide_beauty.yaml "${D[@]}" train.progress=false
echo "== 1+3. tokenizers (embeddings are computed once and cached)"
jaxrec train configs/cofirec/tokenizer_beauty.yaml "${D[@]}" "${TEXT[@]}" train.steps=20000
jaxrec train configs/tiger/tokenizer_beauty.yaml "${D[@]}" "${TEXT[@]}" train.steps=20000
echo "== 4. generators"
jaxrec train configs/cofirec/beauty.yaml "${D[@]}" "${GEN[@]}" "${EXTRA[@]}"
jaxrec train configs/tiger/beauty.yaml "${D[@]}" "${GEN[@]}" "${EXTRA[@]}"
jaxrec train configs/tiger/beauty_letter_codes.yaml "${D[@]}" model.semantic_ids="$DATA/letter_Beauty.index.json" \
  "${GEN[@]}" "${EXTRA[@]}"
echo "== 5. test tables"
for run in cofirec-beauty tiger-beauty tiger-beauty-letter-codes; do jaxrec evaluate "runs/$run"; done
