"""LLaVA-1.5 (work in progress: the constants below are the contract between data.py and the model)."""

IGNORE_INDEX = -100  # labels at prompt, image and pad positions: no loss there (official llava/constants.py)
IMAGE_TOKEN_INDEX = -200  # one id per image in input_ids; the model splices that image's features there
