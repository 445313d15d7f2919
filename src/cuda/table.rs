//! The launch tables of the CUDA penalty kernel, built on the host: one item per parameter tensor
//! (its θ and gradient addresses, its offset in the flat θ*/F buffers, its length), numbered in
//! tiles, split into launches of at most `max_items` items. The bytes of a table are the kernel's
//! parameter (`struct Table` in penalty.cu: keep the two layouts in step).

/// Elements per tile: threads per block × elements per thread (`EWC_TILE` in penalty.cu).
pub const TILE: u64 = 256 * 8;
/// Threads per block (`EWC_BLOCK`).
pub const BLOCK: u32 = 256;

/// One parameter tensor, as the kernel reads it (`struct Item`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Item {
    pub param: u64,
    pub grad: u64,
    pub offset: u64,
    pub len: u64,
    pub first_tile: u32,
    pub add: u32,
}

/// The fields of `struct Table` before its items.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Header {
    star: u64,
    fisher: u64,
    partials: u64,
    coef: f32,
    count: u32,
    tiles: u32,
    pad: u32,
}

const _: () = assert!(std::mem::size_of::<Item>() == 40 && std::mem::size_of::<Header>() == 40);

/// A parameter tensor to run over: addresses of θ and of the gradient target, its length, its
/// offset in the flat buffers, and whether the gradient is added to what the target holds.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub param: u64,
    pub grad: u64,
    pub offset: u64,
    pub len: u64,
    pub add: bool,
}

/// One launch: its items (tiles numbered from 0) and its number of tiles.
#[derive(Debug)]
pub struct Launch {
    pub items: Vec<Item>,
    pub tiles: u32,
}

/// The launches covering `targets` (empty ones skipped), each with at most `max_items` items and
/// at most `i32::MAX` tiles; `None` if one tensor alone has more tiles than that (4·10¹²
/// elements).
pub fn launches(targets: &[Target], max_items: usize) -> Option<Vec<Launch>> {
    const MAX_TILES: u64 = i32::MAX as u64;
    let mut out: Vec<Launch> = Vec::new();
    let mut current = Launch {
        items: Vec::new(),
        tiles: 0,
    };
    for t in targets.iter().filter(|t| t.len > 0) {
        let tiles = t.len.div_ceil(TILE);
        if tiles > MAX_TILES {
            return None;
        }
        if current.items.len() == max_items || current.tiles as u64 + tiles > MAX_TILES {
            let full = std::mem::replace(
                &mut current,
                Launch {
                    items: Vec::new(),
                    tiles: 0,
                },
            );
            out.push(full);
        }
        current.items.push(Item {
            param: t.param,
            grad: t.grad,
            offset: t.offset,
            len: t.len,
            first_tile: current.tiles,
            add: t.add as u32,
        });
        current.tiles += tiles as u32;
    }
    if !current.items.is_empty() {
        out.push(current);
    }
    Some(out)
}

/// The kernel parameter of one launch: header and items, zero-filled to the size of `struct
/// Table` for `max_items` items.
pub fn table_bytes(launch: &Launch, buffers: [u64; 3], coef: f32, max_items: usize) -> Vec<u8> {
    let [star, fisher, partials] = buffers;
    let header = Header {
        star,
        fisher,
        partials,
        coef,
        count: launch.items.len() as u32,
        tiles: launch.tiles,
        pad: 0,
    };
    let mut bytes = vec![0u8; table_size(max_items)];
    // SAFETY: both types are repr(C) plain data without padding (40 bytes each, checked above);
    // the destination ranges lie inside `bytes` (items.len() <= max_items, asserted).
    assert!(launch.items.len() <= max_items);
    unsafe {
        std::ptr::copy_nonoverlapping(
            (&header as *const Header).cast::<u8>(),
            bytes.as_mut_ptr(),
            40,
        );
        std::ptr::copy_nonoverlapping(
            launch.items.as_ptr().cast::<u8>(),
            bytes.as_mut_ptr().add(40),
            40 * launch.items.len(),
        );
    }
    bytes
}

/// `sizeof(Table)` for `max_items` items.
pub fn table_size(max_items: usize) -> usize {
    40 + 40 * max_items
}
