"""The package's import graph keeps helpers below the stages (docs/design.md, "Layers"):

- a stage's modules (the one `python -m pipeline <stage>` runs and, for a `<stage>_cli` command
  module, `<stage>` itself) are imported by no other stage's module, nor by any helper;
- `pipeline.model` imports nothing from the stage packages (train, inference, eval);
- train, inference and eval import each other only through a package's public API: the names in
  its `__init__.py`'s `__all__`.

Imports are read with `ast`, so lazy imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from pipeline.__main__ import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
PEERS = ("pipeline.train", "pipeline.inference", "pipeline.eval")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every import of a pipeline module in `path`, relative ones resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            found.append((target, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return [(target, names) for target, names in found if target == "pipeline" or target.startswith("pipeline.")]


def graph() -> dict[str, list[tuple[str, list[str]]]]:
    return {module_name(path): imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def public_api(package: str) -> set[str]:
    tree = ast.parse((ROOT / package.replace(".", "/") / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def stage_of() -> dict[str, str]:
    """Stage module -> its command: the command's module, and the stage module behind a `*_cli` one
    (kept apart so that `--help` imports no torch)."""
    owners = {}
    for command, (module, _) in COMMANDS.items():
        owners[module] = owners[module.removesuffix("_cli")] = command
    return owners


def stage_violations(edges: dict[str, list[tuple[str, list[str]]]]) -> list[str]:
    owners = stage_of()
    return [f"{module} imports the stage module {target}" for module, targets in edges.items()
            if module != "pipeline.__main__" for target, _ in targets
            if target in owners and owners[target] != owners.get(module)]


def model_violations(edges: dict[str, list[tuple[str, list[str]]]]) -> list[str]:
    return [f"{module} imports {target}" for module, targets in edges.items() if within(module, "pipeline.model")
            for target, _ in targets if any(within(target, peer) for peer in PEERS)]


def api_violations(edges: dict[str, list[tuple[str, list[str]]]]) -> list[str]:
    found = []
    for module, targets in edges.items():
        home = next((peer for peer in PEERS if within(module, peer)), None)
        for target, names in targets:
            peer = next((peer for peer in PEERS if within(target, peer)), None)
            if home is None or peer is None or peer == home:
                continue
            if target != peer:
                found.append(f"{module} imports {target}, inside {peer}")
            elif not names or set(names) - public_api(peer):
                found.append(f"{module} imports {sorted(set(names) - public_api(peer)) or '*'} from {peer}, "
                             f"outside its __all__")
    return found


def test_no_module_imports_a_stage_module():
    assert stage_violations(graph()) == []


def test_model_imports_nothing_from_the_stages():
    assert model_violations(graph()) == []


def test_train_inference_and_eval_meet_only_through_public_apis():
    assert api_violations(graph()) == []


def test_the_public_apis_are_documented_and_small():
    for peer in PEERS:
        init = ROOT / peer.replace(".", "/") / "__init__.py"
        assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), f"{init} has no docstring"
        assert len(public_api(peer)) <= 8, f"{peer}'s __all__ is not small"


def test_the_checks_see_a_violation():
    """Each rule flags an edge that breaks it, so an empty list above means something."""
    stage = next(iter(COMMANDS.values()))[0]
    edges = {"pipeline.artifacts": [(stage, ["run"])], "pipeline.train.sft": [("pipeline.train.pretrain", ["f"])],
             "pipeline.train.sft_cli": [("pipeline.train.sft", ["train"])],
             "pipeline.model.gpt": [("pipeline.inference", ["Engine"])],
             "pipeline.train.x": [("pipeline.eval.loss", ["f"]), ("pipeline.inference", ["not_public"])]}
    assert stage_violations(edges) == [f"pipeline.artifacts imports the stage module {stage}",
                                       "pipeline.train.sft imports the stage module pipeline.train.pretrain"]
    assert model_violations(edges) == ["pipeline.model.gpt imports pipeline.inference"]
    assert len(api_violations(edges)) == 2
