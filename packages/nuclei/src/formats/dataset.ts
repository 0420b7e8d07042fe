// The sidecar JSON of the ../shared/data layout (NAME.json beside NAME.png and NAME.labels.png):
// classNames, the number of instances, and each instance's class by id.
import type { segmentationProto } from '@cfrsam/rpc';

type Nucleus = segmentationProto.Nucleus;

export interface DatasetSidecar {
  source: string;
  classNames: string[];
  instances: number;
  /** "<id>": classIndex; unclassified instances (class -1) are left out. */
  classes: Record<string, number>;
  mpp?: number;
}

export function nucleiToSidecar(nuclei: readonly Nucleus[], classNames: readonly string[], source: string, mpp?: number): DatasetSidecar {
  const classes: Record<string, number> = {};
  for (const n of nuclei) if (n.classIndex >= 0) classes[String(n.id)] = n.classIndex;
  const out: DatasetSidecar = { source, classNames: [...classNames], instances: nuclei.length, classes };
  if (mpp && mpp > 0) out.mpp = mpp;
  return out;
}
