"""Every schema key is read by the code its section configures: a static scan of ngrpo_ray/ (outside config/, where
keys are only declared and checked) for attribute reads `.<field>` on the section: `<expr>.<section>.<field>`, or
`x.<field>` where `x` was bound to `<expr>.<section>` or annotated with the section's dataclass. A key that nothing
reads is accepted and ignored: a defect (wire it or remove it). Documentation-only keys are listed explicitly."""

import ast
import dataclasses
from pathlib import Path

from ngrpo_ray.config import schema

PACKAGE = Path(schema.__file__).resolve().parents[1]
SECTIONS = {f.name: f.type if isinstance(f.type, type) else getattr(schema, f.default_factory.__name__)
            for f in dataclasses.fields(schema.Config)}
# read by people, not code: what hardware a preset was written for
DOCUMENTATION_ONLY = {"model.gpus_expected"}


def _section_of_expr(node: ast.AST) -> str | None:
    return node.attr if isinstance(node, ast.Attribute) and node.attr in SECTIONS else None


def _section_of_annotation(node: ast.AST | None) -> str | None:
    text = ast.unparse(node) if node is not None else ""
    for name, cls in SECTIONS.items():
        if cls.__name__ in text:
            return name
    return None


def reads_in(tree: ast.AST) -> set[str]:
    """'section.field' for every attribute read on a section in this module."""
    aliases: dict[str, str] = {}  # local name -> section (module-wide: names are short-lived and distinct enough)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                pairs = (zip(target.elts, node.value.elts) if isinstance(target, ast.Tuple)
                         and isinstance(node.value, ast.Tuple) else [(target, node.value)])
                for t, v in pairs:
                    if isinstance(t, ast.Name) and _section_of_expr(v):
                        aliases[t.id] = _section_of_expr(v)
        elif isinstance(node, ast.arg) and _section_of_annotation(node.annotation):
            aliases[node.arg] = _section_of_annotation(node.annotation)
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        section = _section_of_expr(node.value)
        if section is None and isinstance(node.value, ast.Name):
            section = aliases.get(node.value.id)
        if section is not None:
            found.add(f"{section}.{node.attr}")
    return found


def all_reads() -> set[str]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "config":
            continue
        found |= reads_in(ast.parse(path.read_text(), str(path)))
    return found


def schema_keys() -> set[str]:
    return {f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def test_every_schema_key_is_read_outside_the_config_package():
    unread = sorted(schema_keys() - all_reads() - DOCUMENTATION_ONLY)
    assert not unread, f"accepted but never read (wire them or remove them): {unread}"


def test_the_scan_finds_reads_and_misses_an_unread_key():
    code = ("def f(cfg, m: MixingConfig):\n"
            "    r = cfg.rollout\n"
            "    t, a = cfg.trainer, cfg.algorithm\n"
            "    return r.group_size + t.lr + a.beta + m.rho + cfg.eval.n + cfg.data.seed_like\n")
    assert reads_in(ast.parse(code)) >= {"rollout.group_size", "trainer.lr", "algorithm.beta", "mixing.rho",
                                         "eval.n"}
    assert "rollout.top_p" not in reads_in(ast.parse(code))
    assert DOCUMENTATION_ONLY <= schema_keys()  # the allow-list names real keys
