"""python -m export_jobs.tf_models {use-multilingual,use-large-style} OUTDIR"""
import argparse

from export_jobs.tf_models import BUILDERS, build


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m export_jobs.tf_models", description=__doc__)
    parser.add_argument("model", choices=sorted(BUILDERS))
    parser.add_argument("out_dir")
    args = parser.parse_args()
    print(build(args.model, args.out_dir))


if __name__ == "__main__":
    main()
