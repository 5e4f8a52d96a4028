"""sammix: few-label CT organ segmentation with GradCAM-prompted, LoRA-tuned Segment Anything."""

__version__ = "0.1.0"


def __getattr__(name):  # keep `import sammix` light: torch loads only when the model is asked for
    if name == "SamMix":
        from sammix.models.sammix import SamMix

        return SamMix
    raise AttributeError(name)
