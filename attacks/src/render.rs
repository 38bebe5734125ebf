//! Pictures of an attacked update: a PNG grid with one row per image of the batch and columns
//! original | what the model saw | each attack's reconstruction (in the order of the JSON
//! record's `attacks`), scaled up so 28x28 images are readable.

use std::path::Path;

use crate::error::{AttackError, Result};

/// One column of the grid: a batch of CHW images in [0, 1].
pub struct Column<'a> {
    /// Images, B x C x H x W.
    pub images: &'a [f32],
}

/// Writes the grid as a PNG (at most `max_rows` rows).
pub fn write_grid(
    path: &Path,
    columns: &[Column<'_>],
    channels: usize,
    size: usize,
    rows: usize,
) -> Result<()> {
    let per = channels * size * size;
    let scale = (96 / size).max(1);
    let cell = size * scale;
    let gap = 4;
    let width = columns.len() * (cell + gap) + gap;
    let height = rows * (cell + gap) + gap;
    let mut img =
        image::RgbImage::from_pixel(width as u32, height as u32, image::Rgb([255, 255, 255]));
    for (ci, col) in columns.iter().enumerate() {
        for r in 0..rows {
            let Some(src) = col.images.get(r * per..(r + 1) * per) else {
                continue;
            };
            let (x0, y0) = (gap + ci * (cell + gap), gap + r * (cell + gap));
            for y in 0..cell {
                for x in 0..cell {
                    let k = (y / scale) * size + x / scale;
                    let px = |c: usize| {
                        (src[c.min(channels - 1) * size * size + k].clamp(0.0, 1.0) * 255.0).round()
                            as u8
                    };
                    img.put_pixel(
                        (x0 + x) as u32,
                        (y0 + y) as u32,
                        image::Rgb([px(0), px(1), px(2)]),
                    );
                }
            }
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| AttackError::Output {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    img.save(path).map_err(|e| AttackError::Output {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}
