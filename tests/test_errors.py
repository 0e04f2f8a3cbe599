"""One exception root: the CLI catches McNodeError alone, and anonymizer imports neither other package."""

import ast
from pathlib import Path

import anonymizer.errors
import cloud.errors
import dicom_node.errors
from anonymizer.errors import McNodeError

ROOT = Path(__file__).resolve().parents[1]


def _error_classes(module):
    return [obj for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == module.__name__]


def test_every_package_error_derives_from_the_one_root():
    for module in (anonymizer.errors, cloud.errors, dicom_node.errors):
        classes = _error_classes(module)
        assert classes, module.__name__
        for cls in classes:
            assert issubclass(cls, McNodeError), f"{module.__name__}.{cls.__name__}"


def test_anonymizer_imports_neither_cloud_nor_dicom_node():
    for path in (ROOT / "anonymizer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("cloud", "dicom_node"), f"{path.name} imports {name}"
