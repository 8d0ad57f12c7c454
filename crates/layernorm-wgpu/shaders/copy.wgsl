//! A plain copy of 16-byte words, for measuring the adapter's own copy bandwidth (benches).

struct Params {
    words: u32,
    groups_x: u32,
    _pad0: vec2<u32>,
    _pad1: vec4<u32>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<u32>>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y * p.groups_x * 256u + gid.x;
    if (i < p.words) {
        dst[i] = src[i];
    }
}
