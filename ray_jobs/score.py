"""`ray job submit` entrypoint: score a corpus on the cluster's GPU actor pool.

    ray job submit --address http://localhost:8265 --working-dir . -- \
        python ray_jobs/score.py --config configs/example.yaml --output s3://bucket/run/score

Takes the same options as `iterit score` and runs the same code; inside a job, Ray connects to the
job's cluster (RAY_ADDRESS is set by the job server).
"""

import sys

from iterit.cli import main

if __name__ == "__main__":
    main(["score", *sys.argv[1:]])
