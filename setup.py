"""Only what pyproject.toml cannot say: install gpt2lab-lm-eval-plugins.pth beside the packages.

That file's one line imports `_gpt2lab_lm_eval_plugins` when Python starts, which registers
gpt2lab's `lm_eval.models` entry point with lm-eval once lm-eval loads its model table, so that
`lm_eval --model gpt2lab ...` works (lm-eval itself reads no entry points; see that module).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = Path(__file__).resolve().parent / "src" / "gpt2lab-lm-eval-plugins.pth"


class BuildPy(build_py):
    def run(self):
        super().run()
        # a wheel's root is site-packages; an editable wheel carries no build_lib files, so there
        # the .pth goes straight into the wheel's root (setuptools' install_lib for it)
        root = self.get_finalized_command("install").install_lib if self.editable_mode else None
        self.copy_file(str(PTH), str(Path(root or self.build_lib) / PTH.name))


setup(cmdclass={"build_py": BuildPy})
