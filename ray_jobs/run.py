"""`ray job submit` entrypoint: the whole IterIT loop on the cluster (ingest, then per iteration
score -> select -> train -> export, then the report).

    ray job submit --address http://localhost:8265 --working-dir . \
        --runtime-env-json '{"env_vars": {"HF_TOKEN": "..."}}' -- \
        python ray_jobs/run.py --config configs/qwen2.5-7b-alpaca.yaml

    # a stopped run (driver killed, job stopped) goes on where it stopped:
    ray job submit --address http://localhost:8265 --working-dir . -- \
        python ray_jobs/run.py --resume s3://my-bucket/runs/qwen2.5-7b-alpaca

Takes the options of `iterit run` (`--config CONFIG` is its positional CONFIG) and runs the same code.
Inside a job Ray connects to the job's cluster (the job server sets RAY_ADDRESS); environment
variables belong in --runtime-env-json, not in ray.init.
"""

import sys

from iterit.cli import main


def cli_args(argv: list[str]) -> list[str]:
    """`--config C` (the form cluster tools write) -> `iterit run C`; everything else passes through."""
    args = list(argv)
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args):
            sys.exit("error: --config needs a YAML file")
        args[i : i + 2] = [args[i + 1]]
    return ["run", *args]


if __name__ == "__main__":
    main(cli_args(sys.argv[1:]))
