"""Small real-data examples beyond ImageNet images: a multi-label pair (scikit-learn's handwritten
digits with binary attributes, float-feature input) and a text pair (Debian package descriptions
labelled by their archive section, token-id input), and a segmentation pair (generated shapes labelled
per pixel, image input). Each builds its data set, trains a little and a big model here in seconds to a
minute or two, and exports both (littlebig.export.tensor_export, littlebig.export.segmentation)."""
