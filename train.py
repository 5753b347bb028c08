"""Research-code compatible entry point: the same Hydra overrides, e.g.

    python -u train.py model=smollm2-135m datasets=[ours] loss=sft granular=false \
        custom_train_path=train.json custom_eval_path=eval.json exp_name=sft_run
    python -u train.py loss=tdpo loss.alpha=0.5 loss.beta=0.1 granular=true \
        custom_train_path=train.json custom_eval_path=eval.json exp_name=tdpo_run \
        model.archive=.cache/runs/sft_run/LATEST
"""

from granular_po.apps.cli import train_main

if __name__ == "__main__":
    raise SystemExit(train_main())
