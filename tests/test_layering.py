"""The engine's layers: a subpackage imports only the ones below it, so the picture has no circles.

Order, lowest first: the top-level modules (errors, progress, _version), io, nn, objects,
infer, train, eval, app. ``train`` may import ``infer`` (the fine-tune preview segments as a
slide would be); nothing imports ``app``. Lazy imports inside functions count too.
"""

import ast
from pathlib import Path

import genselfdiff

PKG = Path(genselfdiff.__file__).parent
LAYERS = ["", "io", "nn", "objects", "infer", "train", "eval", "app"]
# Sideways is allowed only where said: eval and train do not import each other.
RANK = {name: i for i, name in enumerate(LAYERS)}
RANK["eval"] = RANK["train"]


def subpackage(module: str) -> str:
    """'genselfdiff.io.slides' -> 'io'; top-level modules -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in RANK else ""


def engine_imports(path: Path) -> list:
    """(line, imported module) for every import of a genselfdiff module in ``path``."""
    module = "genselfdiff." + ".".join(path.relative_to(PKG).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("genselfdiff"):
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
                found += [(node.lineno, t) for t in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("genselfdiff")]
    return found


def test_no_import_runs_up_or_sideways():
    wrong = []
    for path in sorted(PKG.rglob("*.py")):
        if path.parent == PKG:
            continue  # the top level: its __init__ only names the public API, lazily
        mine = subpackage("genselfdiff." + ".".join(path.relative_to(PKG).with_suffix("").parts))
        for line, target in engine_imports(path):
            theirs = subpackage(target if target.count(".") > 1 else target + ".x")
            if theirs != mine and RANK[theirs] >= RANK[mine]:
                wrong.append(f"{path.relative_to(PKG)}:{line} imports {target} ({theirs or 'top'} is not below {mine})")
    assert not wrong, "\n".join(wrong)


def test_every_subpackage_says_its_idea_and_what_it_may_import():
    for sub in LAYERS[1:]:
        doc = ast.get_docstring(ast.parse((PKG / sub / "__init__.py").read_text())) or ""
        assert "May import" in doc, sub


MAX_LINES = 400  # a module past this has become several ideas
MAX_MODULES = 12  # a folder past this has become several subpackages (__init__.py not counted)
UI = Path(__file__).resolve().parents[1] / "napari_genselfdiff"


def test_modules_stay_small_and_folders_few():
    long, crowded = [], []
    for root in (PKG, UI):
        for folder in [root, *(p for p in root.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
            modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
            if len(modules) > MAX_MODULES:
                crowded.append(f"{folder.relative_to(root.parent)}: {len(modules)} modules")
            long += [f"{p.relative_to(root.parent)}: {n} lines" for p in modules
                     if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, "\n".join(long)
    assert not crowded, "\n".join(crowded)


def test_only_the_recipes_know_their_names():
    """The official recipe is one object (train/recipe.py); other modules ask it, not its name."""
    asking = [f"{p.relative_to(PKG)}:{i}" for p in sorted(PKG.rglob("*.py")) if p.name != "recipe.py"
              for i, line in enumerate(p.read_text().splitlines(), 1)
              if "recipe" in line and ('== "official"' in line or '!= "official"' in line)]
    assert not asking, "\n".join(asking)
