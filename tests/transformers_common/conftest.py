def pytest_configure(config):
    # marks transformers' test_modeling_common.py uses (registered in transformers' own conftest, not shipped)
    for mark in (
        "accelerate_tests",
        "flash_attn_test",
        "flash_attn_3_test",
        "flash_attn_4_test",
        "torch_compile_test",
        "torch_export_test",
        "generate",
        "training_ci",
        "tensor_parallel_ci",
        "is_training_test",
        "is_pipeline_test",
        "is_staging_test",
        "not_device_test",
        "bitsandbytes",
    ):
        config.addinivalue_line("markers", f"{mark}: used by transformers' common tests")
