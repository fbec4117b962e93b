#!/usr/bin/env bash
# Regenerate every committed `tiny` result in one run, from the current cache (or an empty one):
# the world and the judge's perplexity of its SFT samples (data/results/tiny/judge_perplexity.txt), the
# preference pairs, the reward model, all 60 sweep runs (2 jobs of 1 thread each on a 2-core machine),
# the longer DPO and PPO runs (scripts/longer_runs.py), the temperature and fluency tables, every
# figure, and the outputs of the notebooks and their solutions. Each step's wall time goes to stdout and to data/results/tiny/regenerate.log; the steps'
# own output to stdout only. Usage: bash scripts/regenerate_tiny.sh [JOBS]  (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${1:-2}
log=data/results/tiny/regenerate.log
mkdir -p data/results/tiny
export DPO_LAB_PROFILE=tiny
step() {  # step NAME COMMAND...: run it, print its wall time
    local name=$1 start=$SECONDS
    shift
    "$@"
    echo "regenerate: ${name} took $(( SECONDS - start )) s" | tee -a "$log"
}
: > "$log"
step prepare dpo-lab prepare --profile tiny
judge() { python benchmarks/judge_perplexity.py --profile tiny | tee data/results/tiny/judge_perplexity.txt; }
step judge-perplexity judge
step preferences dpo-lab preferences --profile tiny
step reward dpo-lab reward --profile tiny
step frontier dpo-lab frontier --profile tiny --methods all --jobs "$jobs"
step longer-runs python scripts/longer_runs.py --profile tiny
step temperature dpo-lab temperature --profile tiny
step fluency dpo-lab fluency --profile tiny
for notebook in notebooks/0*.ipynb notebooks/solutions/0*.ipynb; do
    step "$notebook" jupyter nbconvert --to notebook --execute --inplace \
        --ExecutePreprocessor.timeout=3600 "$notebook"
done
echo "regenerate: total $SECONDS s" | tee -a "$log"
