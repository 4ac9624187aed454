"""The parts a SAISA model is built from, one file each: decoder backbones (`backbones/`), vision encoders
(`encoders/`) and the connectors that project visual features (`connectors.py`)."""
