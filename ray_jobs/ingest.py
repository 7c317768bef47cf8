"""`ray job submit` entrypoint: normalise a corpus on the cluster, next to its data.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/ingest.py --config configs/example.yaml --output s3://bucket/run/ingest

Takes the same options as `iterit ingest` and runs the same code.
"""

import sys

from iterit.cli import main

if __name__ == "__main__":
    main(["ingest", *sys.argv[1:]])
