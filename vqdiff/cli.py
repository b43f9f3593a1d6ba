"""The ``vqdiff`` command: a dispatcher. Each subcommand's flags and work live in the module that owns
them, named below as ``module:function``; the function adds the flags to the subcommand's parser and
sets ``func``, the work. A subcommand's module is imported only when the command line names it, so
``vqdiff --help`` loads nothing heavy. Bad input fails with one line and exit status 2, never a
traceback."""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys

COMMANDS = (
    (("info",), "vqdiff.model.io.commands:add_info", "describe a model folder"),
    (("generate",), "vqdiff.model.sampling.generate:add_arguments", "generate images from a prompt"),
    (("edit",), "vqdiff.model.sampling.generate:add_edit_arguments",
     "repaint an image's masked region from a prompt, or make variations (--strength)"),
    (("eval",), "vqdiff.model.shapes.evaluate:add_arguments",
     "prompt fidelity / quality / diversity on the shapes benchmark"),
    (("convert",), "vqdiff.model.io.commands:add_convert",
     "rewrite a model folder as safetensors (dtype, defaults, provenance)"),
    (("serve",), "vqdiff.server.commands:add_arguments",
     "run the inference server: HTTP (default port 8000) and gRPC (50051)"),
    (("data", "shapes"), "vqdiff.model.shapes.commands:add_data_shapes",
     "the procedural shapes dataset (model/shapes/scenes.py), deterministic from a seed"),
    (("train", "features"), "vqdiff.model.shapes.commands:add_train_features",
     "the shapes benchmark's feature network (for the Fréchet distance)"),
    (("train", "vqvae"), "vqdiff.model.train.vqvae:add_arguments", "train the VQVAE on an image-caption folder"),
    (("train", "transformer"), "vqdiff.model.train.transformer:add_arguments",
     "train the diffusion transformer (and its text encoder) on an image-caption folder"),
    (("train", "null-cond"), "vqdiff.model.train.transformer:add_null_cond_arguments",
     "fine-tune a trained model with a null condition (the paper's fine-tuning step)"),
    (("train", "clip"), "vqdiff.model.train.clip:add_arguments",
     "pretrain the text encoder contrastively (CLIP) on an image-caption folder"),
    (("init",), "vqdiff.model.io.commands:add_init", "write a randomly initialised model folder from a preset"),
)
GROUPS = {"data": "write datasets as image-caption folders", "train": "training entry points (resumable)"}


class _Parser(argparse.ArgumentParser):
    """A parser whose flags are added by ``adder`` ("module:function") when it first parses."""

    adder: str | None = None

    def parse_known_args(self, args=None, namespace=None):
        leaf = self.adder is not None
        if leaf:
            module, name = self.adder.split(":")
            self.adder = None
            getattr(importlib.import_module(module), name)(self)
        namespace, extras = super().parse_known_args(args, namespace)
        flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        for extra in extras if leaf else ():  # a subcommand's unknown flag: name the closest one
            if close := difflib.get_close_matches(extra.split("=", 1)[0], flags, n=1, cutoff=0.6):
                self.error(f"unrecognized argument {extra}: did you mean {close[0]}?")
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vqdiff", description="Improved VQ-Diffusion: model tools and server")
    top = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, adder, help in COMMANDS:
        sub = top
        if len(words) == 2:
            if words[0] not in groups:
                groups[words[0]] = top.add_parser(words[0], help=GROUPS[words[0]]).add_subparsers(
                    dest="what", required=True, parser_class=_Parser)
            sub = groups[words[0]]
        sub.add_parser(words[-1], help=help).adder = adder
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # ModelFolderError is a ValueError
        print(f"vqdiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
