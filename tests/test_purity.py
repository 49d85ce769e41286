import ast
from pathlib import Path

FORBIDDEN = {"prefect", "mlflow", "great_expectations"}


def test_components_import_no_orchestration_or_tracking():
    for path in Path("components").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad = {n.split(".")[0] for n in names} & FORBIDDEN
            assert not bad, f"{path} imports {bad}"
