// 16-bit greyscale PNG label maps (0 = background, i = instance i), the ../shared/data layout.
import sharp from 'sharp';

export async function encodeLabelPng(labels: Uint16Array, width: number, height: number): Promise<Buffer> {
  if (labels.length !== width * height) throw new RangeError(`expected ${width * height} labels, got ${labels.length}`);
  // sharp takes 16-bit raw input from a Uint16Array (a Buffer would be read as 8-bit samples).
  return sharp(labels, { raw: { width, height, channels: 1 } })
    .toColourspace('grey16')
    .png({ compressionLevel: 9 })
    .toBuffer();
}

export async function decodeLabelPng(png: Uint8Array): Promise<{ labels: Uint16Array; width: number; height: number }> {
  const { data, info } = await sharp(png).toColourspace('grey16').raw({ depth: 'ushort' }).toBuffer({ resolveWithObject: true });
  if (info.channels !== 1) throw new RangeError(`label PNG has ${info.channels} channels, expected 1`);
  const labels = new Uint16Array(info.width * info.height);
  for (let i = 0; i < labels.length; i++) labels[i] = data.readUInt16LE(i * 2);
  return { labels, width: info.width, height: info.height };
}
