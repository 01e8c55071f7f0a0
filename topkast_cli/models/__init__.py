"""Models: each config in conf/model/ names a constructor with `_target_`; the trainer passes
what the dataset says the model needs (`DataModule.model_kwargs`): `num_classes` and
`input_shape` (per-sample, e.g. (3, 32, 32)) for classification, `vocab_size` and `context`
for text.

mlp.py, cnn1d.py (MNIST-1D), cnn2d.py (small images), resnet.py (torchvision's ResNet-18/50 with a small-image
stem), wrn.py (CIFAR wide ResNets), vgg.py (CIFAR VGG with batch norm), transformer.py
(decoder-only Transformer for next-token prediction), hf.py (GPT-2 from Hugging Face
`transformers`, an optional extra, imported only when that model is built).
"""
