//! `embed_cached` against the real encoder: a miss embeds and writes the file, a hit reads the
//! file without embedding, and a corrupt file is replaced. Needs the assets from
//! `llmroute setup` and fails, rather than skips, without.

use indicatif::ProgressBar;
use ndarray::Array2;

use llmroute_policy::assets::{self, Assets};
use llmroute_policy::embedding_cache::{CacheKey, cache_file_path, embed_cached, write_embeddings};
use llmroute_policy::encoder::{EMBEDDING_DIM, Encoder};

fn load_encoder() -> Encoder {
    let cache = assets::default_cache_dir().unwrap_or_else(|error| panic!("{error}"));
    let assets = Assets::locate(&cache).unwrap_or_else(|error| {
        panic!(
            "encoder assets not found in {}: {error}\nThe example `cargo run -p llmroute-policy --example setup` also sets them up; set LLMROUTE_CACHE to use another folder.",
            cache.display()
        )
    });
    Encoder::load(&assets, 1).unwrap_or_else(|error| panic!("{error}"))
}

#[test]
fn second_call_reads_the_file() {
    let mut encoder = load_encoder();
    let folder = tempfile::tempdir().unwrap();
    let prompts: Vec<String> = ["Summarise this contract.", "2 + 2 = ?", "hello"]
        .map(String::from)
        .to_vec();

    let progress = ProgressBar::hidden();
    let first = embed_cached(&mut encoder, folder.path(), "sample", &prompts, &progress).unwrap();
    assert_eq!(first.dim(), (prompts.len(), EMBEDDING_DIM));
    assert_eq!(progress.position(), prompts.len() as u64);
    let key = CacheKey::new(encoder.digest(), &prompts).unwrap();
    let path = cache_file_path(folder.path(), "sample", &key).unwrap();
    assert!(path.is_file(), "{} was not written", path.display());

    // Replace the cached values by a marker: a hit must return the marker, proving that the
    // second call read the file instead of embedding again.
    let marker = Array2::from_elem((prompts.len(), EMBEDDING_DIM), 0.25f32);
    write_embeddings(&path, &key, &marker).unwrap();
    let second = embed_cached(
        &mut encoder,
        folder.path(),
        "sample",
        &prompts,
        &ProgressBar::hidden(),
    )
    .unwrap();
    assert_eq!(second, marker);

    // A truncated file is not trusted: the embeddings are computed and written again.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let third = embed_cached(
        &mut encoder,
        folder.path(),
        "sample",
        &prompts,
        &ProgressBar::hidden(),
    )
    .unwrap();
    let difference = (&third - &first)
        .mapv(f32::abs)
        .fold(0.0f32, |a, &b| a.max(b));
    assert!(
        difference <= 1e-6,
        "recomputed embeddings differ by {difference:.3e}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap().len(),
        bytes.len(),
        "file rewritten whole"
    );
}
