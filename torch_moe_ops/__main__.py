"""``python -m torch_moe_ops demo [flags]``: the main job (see ``torch_moe_ops.demo``)."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_moe_ops")
    sub = parser.add_subparsers(dest="command", required=True)
    from .demo import add_arguments, run

    add_arguments(sub.add_parser("demo", help="compile fused_moe in bf16 and every quantized scheme of the registry, "
                                              "print a table; then load, quantize online, compile and reload a model"))
    args = parser.parse_args(argv)
    if args.command == "demo":
        return run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
