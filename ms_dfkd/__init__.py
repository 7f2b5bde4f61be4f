"""ms-dfkd: data-free knowledge distillation by text-to-text transfer (DFKD-T3) in MindSpore."""
__version__ = "0.1.0"
