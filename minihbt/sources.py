"""What minihbt.download knows how to fetch: endpoints, model aliases, and the datasets
pinned to a commit with the SHA-256 of every file."""

HF_ENDPOINT = "https://huggingface.co"
GITHUB_RAW = "https://raw.githubusercontent.com"
ENV_HF = "MINIHBT_HF_ENDPOINT"        # falls back to HF_ENDPOINT, as huggingface_hub reads it
ENV_GITHUB = "MINIHBT_GITHUB_RAW"
USER_AGENT = "minihbt-download/0.1"
CHUNK = 1 << 20
TIMEOUT = 60.0

MODELS = {
    "xlm-roberta-base": "FacebookAI/xlm-roberta-base",
    "xlm-roberta-large": "FacebookAI/xlm-roberta-large",
    "labse": "sentence-transformers/LaBSE",
    "multilingual-e5-small": "intfloat/multilingual-e5-small",
    "multilingual-e5-base": "intfloat/multilingual-e5-base",
}
REQUIRED_MODEL_FILES = ("config.json", "tokenizer.json")
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
OPTIONAL_MODEL_FILES = ("tokenizer_config.json", "special_tokens_map.json", "modules.json",
                        "sentence_bert_config.json", "1_Pooling/config.json")

# Pinned sources (from ../shared/data/PROVENANCE.tsv). A file `rel` of dataset NAME comes from
# {GITHUB_RAW}/{repo}/{commit}/{prefix}{rel}, is saved as DIR/rel, and is DIR_MIRROR/NAME/rel
# in a local mirror laid out like ../shared/data.
DATASETS = {
    "xquad-r": {
        "repo": "google-research-datasets/lareqa",
        "commit": "9bc8c7fb6dd8d01d72a05a93c2cb96882b0d299c",
        "prefix": "xquad-r/",
        "files": {
            "ar.json": "c52922d3b8ac1ae03ed5ac38647ad59870dca3dda2beefe18ecdc30729acb69d",
            "de.json": "16fb0f4bf4916154b585a20c24c66074591c9718a1affe764ff4697572328949",
            "el.json": "163fd43ee785a30eb534ae2061e9eaa766a7ee4e8ffce5e4b422480c150f64b6",
            "en.json": "7b0954f39297c27a31fef610f0883337dd2907fa8699151dc922afdd0fa12ffe",
            "es.json": "f8e836b2d91009c4363e04315f7ede363eedbbb49c67dda60de6c4aa782f58de",
            "hi.json": "ea45ba8ae4513d1533b222bebdc02a90bc319c055d3aeea68584a053d2e92872",
            "ru.json": "7f4dff853538b9a5fcc28c070b8bb983a5c5d190ac747b8e005a1ada9cab18f1",
            "th.json": "c3a041864c3a9fb0b4dd91cfdf99cf36b411b3e704c58a303c97bc6dc786cfe4",
            "tr.json": "f3e8c13002bbce154a4578f535f7533cb70f3da08840e6b62735935baec7bd94",
            "vi.json": "e35926bf5cc6fc6ecbdfca49467aabeb454f08d152d7818143a906bd31dde995",
            "zh.json": "80c2cde7b9c2fb134c303cbb52f2ba396ead9eb0014aec43993543d2ba9e93ed",
        },
    },
    "mlqa-r": {
        "repo": "google-research-datasets/lareqa",
        "commit": "354d67d1cd066854cdfbf5ad0e6105528976141d",
        "prefix": "mlqa-r/",
        "files": {
            "ar.json": "2132fbc03208535c0fe01f2e2c5121d06f9c2aa799af93b0a719dbc105bdf137",
            "de.json": "ce9454dc5aa6f2d85c23cd6e49cb367fbb7c4c6e62d7f71e355c6b5dae4d0886",
            "en.json": "fedd9a5cc0848dda80caf84aa36f482adaae230526a3f6e9e86926a93ef3b1e4",
            "es.json": "70ecba276b8c96a692b120693a595d076ce94ad21d4b28311538a9fcbfe0f9d7",
            "hi.json": "4dd0fb3c06f737a5481d705bc1dcac7876712a5815c9265908fbb3a0696cb654",
            "vi.json": "9d3baff6ba03e6793b25594217265ea59a136b9733833dca8a9582a84a78ff85",
            "zh.json": "57f01d2fff50cf3392805635b01445339f225ad5bf28ba8443b12f8dbd1e69dc",
        },
    },
    "mlqa": {   # MLQA v1 dev set (facebookresearch/MLQA), from a GitHub copy pinned by commit
        "repo": "wuhjie/few_shots_that_matters_wu",
        "commit": "6bfe6324e428ec21a777b5543cd8e50ec82dcb3c",
        "prefix": "data/mlqa/",
        "files": {
            "MLQA_V1/dev/dev-context-ar-question-ar.json": "804d8e1a5355486d837432af08c68e33cf4ea16361142775f0ba700bcde91b40",
            "MLQA_V1/dev/dev-context-ar-question-de.json": "bcd2720bc909b1b327bc444e560b0557d67c83d76d36ee1ca47c41d9c87c5d37",
            "MLQA_V1/dev/dev-context-ar-question-en.json": "8120087c2510b993222397c86c3d18b209ec5c791f277a8eeb8725d5bbd9b5e7",
            "MLQA_V1/dev/dev-context-ar-question-es.json": "f68b7df60c8912e02f32f3a1bbe9c3b030838fd6f92815a9b706cf3655815906",
            "MLQA_V1/dev/dev-context-ar-question-hi.json": "eb745cb5113e1ccef5ee629b2d09055e85339655b199cf80656ddd21d058b2e0",
            "MLQA_V1/dev/dev-context-ar-question-vi.json": "56f576190df6e40410ad99e6b0f89b4ab6d64840e816db47478e10389696d4ce",
            "MLQA_V1/dev/dev-context-ar-question-zh.json": "1dc93ce968b43548ca90aa0376f36fb9bc2fa426822f8921fb6b19d5e4c130dc",
            "MLQA_V1/dev/dev-context-de-question-ar.json": "8141d61fec7e9f039a679729faa7b897301734f9ef6bfa9a43afa44d189f0b85",
            "MLQA_V1/dev/dev-context-de-question-de.json": "c60546f273b3951da2e1fcad1f078d9d422f02b0a49e31fdeca41f6bd48e4b2e",
            "MLQA_V1/dev/dev-context-de-question-en.json": "a756f172086fc5a7c79a7741eeb7d8cc48d941e70ffe9aec38bf23ad75bd9e77",
            "MLQA_V1/dev/dev-context-de-question-es.json": "f1ebf4679b2ad86d21a17eb1ade9b8ead476aa5fdddd58f42d1c44eda23a97c2",
            "MLQA_V1/dev/dev-context-de-question-hi.json": "8882f3fa6ee8804e81acdf09d4e96a5d294187a87860639e0791b6fe9c6a74c7",
            "MLQA_V1/dev/dev-context-de-question-vi.json": "f8ba0abf1aebe23d3778ff72b553e680ed0ed78a39f1c525a912de76708f3e48",
            "MLQA_V1/dev/dev-context-de-question-zh.json": "b9fd64c411fe747d95aa7fa0e19254ec06fafcfa4a249ce8772063fbc766c2ac",
            "MLQA_V1/dev/dev-context-en-question-ar.json": "1acaa6e37c7ff7fb21d801a8f3d860c5daae63741d9c4ab3f5be24a8b25f0fd9",
            "MLQA_V1/dev/dev-context-en-question-de.json": "e8418680f801fb00e33632f700c254f648ce83558773b86621a45e973721144f",
            "MLQA_V1/dev/dev-context-en-question-en.json": "85e0b48afa438f2938b6d74f3896133c87cb5f96e68d5280c5a36f67a6c56ab1",
            "MLQA_V1/dev/dev-context-en-question-es.json": "e9e9bca9c84d2a670c4d77d7a2d4a8d52417389e5ba976fa1255b04f95478970",
            "MLQA_V1/dev/dev-context-en-question-hi.json": "b2476e60901c6ac2a37c08b453a372cc6734ec980e75ba66a9aacdc0617a074a",
            "MLQA_V1/dev/dev-context-en-question-vi.json": "a72686443b4c219bf2c99113849a28b59bfcf38e6a55e8b3f8c9d8474d99c66d",
            "MLQA_V1/dev/dev-context-en-question-zh.json": "262215219ff9d8f5eb555f0b88b99c96316610143bf30d01f54e2aa38f2706fc",
            "MLQA_V1/dev/dev-context-es-question-ar.json": "225d3945227ac2836c950fd21de50d5ea2fbc47e1bd9813b9cfed5cfb849f190",
            "MLQA_V1/dev/dev-context-es-question-de.json": "da5a797cc5397ab9c41bd718d48564dd4b1ad5583366ddab96743116f975c31c",
            "MLQA_V1/dev/dev-context-es-question-en.json": "f88753a3b0d26945ac40c285dbb293786a24c91f2da8d7dc006b293929f1850c",
            "MLQA_V1/dev/dev-context-es-question-es.json": "e9f057ed81a6ca652eda2f610a66d06cc9fe0944c0c3efd854fab1b60b6a687a",
            "MLQA_V1/dev/dev-context-es-question-hi.json": "81fb1702bb4901b5cdfa2b552e0a3164671b4935fa098320a8dd36659571fb30",
            "MLQA_V1/dev/dev-context-es-question-vi.json": "5b46239d97dc3defe305a3ca436f587e4a4939e2952901c3131b41ded0167077",
            "MLQA_V1/dev/dev-context-es-question-zh.json": "167d041880d4bb78dddb777218a076002c76b6b15bb94a292cc81f332ae9c523",
            "MLQA_V1/dev/dev-context-hi-question-ar.json": "8c26f39f657d1d6a07a519d2729286f26bd33f0d35d5557ce2fc6f6b89eec8c9",
            "MLQA_V1/dev/dev-context-hi-question-de.json": "dcd582ff7ef075170dd0609dd0933c63f650c4ac3ddb1af8b68d93fd487592c5",
            "MLQA_V1/dev/dev-context-hi-question-en.json": "c555473fa7c2b4f81f72137c2e2da49d414b7aeeba7e2eeb143347ce7e54924e",
            "MLQA_V1/dev/dev-context-hi-question-es.json": "8335a208ecc0702999ead0942e0fb1be6c0040b526d232b0fe6ca3de2feb7832",
            "MLQA_V1/dev/dev-context-hi-question-hi.json": "36034fc6df13ee8955663550aa6ba014811094155c5392eb62014e4b02ffb391",
            "MLQA_V1/dev/dev-context-hi-question-vi.json": "6fcaffdc88fb9fe350a1a1734212f9444ec8eb1a3737b652bc787bc9de5ae42e",
            "MLQA_V1/dev/dev-context-hi-question-zh.json": "9ab9944c7da2450396509bbb132498276c0530e1e0a5470bc37b8d88fbc05ddc",
            "MLQA_V1/dev/dev-context-vi-question-ar.json": "c1bfa036f7625773e7d94f13237e43d98821077456602dcb8d2edb7964b2ef49",
            "MLQA_V1/dev/dev-context-vi-question-de.json": "0e0e7e091864f394d92db5bcd7a38bc94ca74ea2463d5a3798b58157897d8b9b",
            "MLQA_V1/dev/dev-context-vi-question-en.json": "734e5f1c34266c3c2fbbceab254f499740414479c3d3c5c7cd8f7bc1fcd24f0f",
            "MLQA_V1/dev/dev-context-vi-question-es.json": "fa1ff37ae0c5e54995fd4c2fd9a8879253ea84610866f205fbfb96d0c80a30cc",
            "MLQA_V1/dev/dev-context-vi-question-hi.json": "952b0392e1ae2e81f498eed2578a4b697f96d1f8ddaea16b3e8b74dc949fa86f",
            "MLQA_V1/dev/dev-context-vi-question-vi.json": "51ad1550db566e224e5ac8c149234d022bac92a68c32e38b4c3c83fc31e34e81",
            "MLQA_V1/dev/dev-context-vi-question-zh.json": "7c27ba4ac47a219ba1e84bfa85b6f1db4b4f9e4fd6042c908de8d2c3a8c5b64f",
            "MLQA_V1/dev/dev-context-zh-question-ar.json": "149c157ed03c851a9bc7aa0054f927e8278f0772023b6c6f0ea18f4cf0933785",
            "MLQA_V1/dev/dev-context-zh-question-de.json": "cf2a2d38f0330e296931b287d403c03c02a55a63c4c4c3da12f197b2f52d4516",
            "MLQA_V1/dev/dev-context-zh-question-en.json": "24a6514c9a86b07020a3a952738f2df57844960a300c0a5eb72b99ea7182db5e",
            "MLQA_V1/dev/dev-context-zh-question-es.json": "2d7de3e88893ccd5e3388aa573e6bb18428281503a6d3679e11e0bb0163c2c11",
            "MLQA_V1/dev/dev-context-zh-question-hi.json": "cc6f9cfb69165101d36eb97ce7577fa9cd61a235dfc90ab3201922c73dd091ac",
            "MLQA_V1/dev/dev-context-zh-question-vi.json": "bbd03f48e28c441186960558499f0e9481eba249cc66e42256ed3b6397db0322",
            "MLQA_V1/dev/dev-context-zh-question-zh.json": "8fad23a8bb5618361209c04313218eff96139682006ff533f8533eb3f2691486",
        },
    },
}
