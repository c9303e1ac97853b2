// The tensor view's 3-D mode: a 2-D slice drawn as a surface or a field of bars with three.js
// (WebGL), rotated by dragging and zoomed by the wheel, with the same hover readout as the
// heatmap. Loaded by tensor.js on first use only (three.js is ~2 MB).
//
// Row i of the slice runs along z (row 0 at the back, as a heatmap's top row), column j along x
// (column 0 on the left); height is value / amplitude. A slice wider than the grid limit is
// drawn every `stride`-th element in both directions: each vertex or bar IS one element, and
// the readout names that element's full index and exact value.

import * as THREE from '../vendor/three/three.module.js';
import { offsetOf, lutColour } from './tensor.js';

const LIMIT = { surface: 256, bars: 64 };   // elements per side drawn at most
const HEIGHT = 0.6;                          // world height of the amplitude

export class Viewer3D {
  constructor(onHover) {
    this.onHover = onHover;
    this.host = document.createElement('div');
    this.host.className = 'gx-3d';
    this.renderer = new THREE.WebGLRenderer({ antialias: true, preserveDrawingBuffer: true });
    this.renderer.setPixelRatio(window.devicePixelRatio || 1);
    this.canvas = this.renderer.domElement;
    this.canvas.classList.add('gx-3d-canvas');
    this.host.append(this.canvas);
    this.scene = new THREE.Scene();
    this.scene.background = new THREE.Color(0xffffff);
    this.scene.add(new THREE.AmbientLight(0xffffff, 1.6));
    const sun = new THREE.DirectionalLight(0xffffff, 1.4);
    sun.position.set(1, 3, 2);
    this.scene.add(sun);
    this.camera = new THREE.PerspectiveCamera(40, 1, 0.01, 100);
    this.orbit = { theta: 0, phi: 0.6, radius: 3.0 };   // around the y axis, from the zenith
    this.target = new THREE.Vector3();                   // the middle of the drawn slice
    this.mesh = null;
    this.grid = null;
    this.raycaster = new THREE.Raycaster();
    this.pointer = new THREE.Vector2();
    this.pending = null;
    this.listen();
  }

  listen() {
    const c = this.canvas;
    let drag = null;
    c.addEventListener('pointerdown', (e) => { drag = { x: e.clientX, y: e.clientY }; c.setPointerCapture(e.pointerId); });
    c.addEventListener('pointerup', (e) => { drag = null; c.releasePointerCapture(e.pointerId); });
    c.addEventListener('pointermove', (e) => {
      if (drag) {
        this.orbit.theta -= (e.clientX - drag.x) * 0.01;
        this.orbit.phi = Math.min(Math.max(this.orbit.phi - (e.clientY - drag.y) * 0.01, 0.05), Math.PI - 0.05);
        drag = { x: e.clientX, y: e.clientY };
        this.render();
        return;
      }
      this.pending = e;
      if (this.hoverFrame) return;
      this.hoverFrame = requestAnimationFrame(() => { this.hoverFrame = 0; this.hover(this.pending); });
    });
    c.addEventListener('wheel', (e) => {
      e.preventDefault();
      this.orbit.radius = Math.min(Math.max(this.orbit.radius * Math.exp(e.deltaY * 0.001), 0.5), 20);
      this.render();
    }, { passive: false });
  }

  // The element under a pointer event, or null: [row, column] of the slice.
  pick(e) {
    if (!this.mesh) return null;
    const rect = this.canvas.getBoundingClientRect();
    this.pointer.set(((e.clientX - rect.left) / rect.width) * 2 - 1, -((e.clientY - rect.top) / rect.height) * 2 + 1);
    this.raycaster.setFromCamera(this.pointer, this.camera);
    const hit = this.raycaster.intersectObject(this.mesh, false)[0];
    if (!hit) return null;
    const { gC, stride } = this.grid;
    let cell;
    if (this.mesh.isInstancedMesh) cell = hit.instanceId;
    else if (this.mesh.isPoints) cell = hit.index;
    else {  // the triangle's vertex nearest the hit point
      const pos = this.mesh.geometry.attributes.position;
      const v = new THREE.Vector3();
      let best = Infinity;
      for (const i of [hit.face.a, hit.face.b, hit.face.c]) {
        const d = v.fromBufferAttribute(pos, i).distanceToSquared(hit.point);
        if (d < best) { best = d; cell = i; }
      }
    }
    return [Math.floor(cell / gC) * stride, (cell % gC) * stride];
  }

  hover(e) {
    const rc = this.pick(e);
    if (!rc) return;
    const index = this.grid.fixed.slice();
    index[this.grid.r] = rc[0];
    index[this.grid.c] = rc[1];
    this.onHover(index);
  }

  // Draw tensor `t`'s slice: rows along dim view.r, columns along view.c, the other dims at
  // view.fixed; colours and heights over [-amp, amp].
  show(t, view, amp, kind) {
    const R = t.shape[view.r], C = t.shape[view.c];
    const stride = Math.max(1, Math.ceil(Math.max(R, C) / LIMIT[kind]));
    const gR = Math.ceil(R / stride), gC = Math.ceil(C / stride);
    this.grid = { r: view.r, c: view.c, fixed: view.fixed, stride, gR, gC };
    const span = Math.max(gR, gC);
    const sx = 2 / span, sz = 2 / span;
    this.raycaster.params.Points.threshold = sx / 2;
    const x0 = -((gC - 1) * sx) / 2, z0 = -((gR - 1) * sz) / 2;
    const base = offsetOf(t.strides, view.fixed);
    const sr = t.strides[view.r] * stride, sc = t.strides[view.c] * stride;
    const height = (v) => (Number.isFinite(v) ? (v / amp) * HEIGHT : 0);
    if (this.mesh) {
      this.scene.remove(this.mesh);
      this.mesh.geometry.dispose();
      this.mesh.material.dispose();
    }
    if (kind === 'bars') {
      const geom = new THREE.BoxGeometry(1, 1, 1);
      const mat = new THREE.MeshLambertMaterial();
      const mesh = new THREE.InstancedMesh(geom, mat, gR * gC);
      const m = new THREE.Matrix4(), colour = new THREE.Color();
      for (let y = 0; y < gR; y++) {
        for (let x = 0; x < gC; x++) {
          const v = t.num[base + y * sr + x * sc];
          const h = height(v);
          const hh = Math.max(Math.abs(h), 0.002);
          m.makeScale(sx * 0.85, hh, sz * 0.85);
          m.setPosition(x0 + x * sx, h / 2, z0 + y * sz);
          const i = y * gC + x;
          mesh.setMatrixAt(i, m);
          const [r, g, b] = lutColour(v, amp);
          mesh.setColorAt(i, colour.setRGB(r, g, b, THREE.SRGBColorSpace));
        }
      }
      mesh.computeBoundingSphere();
      this.mesh = mesh;
    } else {
      const n = gR * gC;
      const pos = new Float32Array(n * 3), col = new Float32Array(n * 3);
      const colour = new THREE.Color();
      for (let y = 0; y < gR; y++) {
        for (let x = 0; x < gC; x++) {
          const v = t.num[base + y * sr + x * sc];
          const i = y * gC + x;
          pos[3 * i] = x0 + x * sx; pos[3 * i + 1] = height(v); pos[3 * i + 2] = z0 + y * sz;
          const [r, g, b] = lutColour(v, amp);
          colour.setRGB(r, g, b, THREE.SRGBColorSpace);
          col[3 * i] = colour.r; col[3 * i + 1] = colour.g; col[3 * i + 2] = colour.b;
        }
      }
      const index = [];
      for (let y = 0; y + 1 < gR; y++) {
        for (let x = 0; x + 1 < gC; x++) {
          const a = y * gC + x, b = a + 1, c = a + gC, d = c + 1;
          index.push(a, c, b, b, c, d);
        }
      }
      const geom = new THREE.BufferGeometry();
      geom.setAttribute('position', new THREE.BufferAttribute(pos, 3));
      geom.setAttribute('color', new THREE.BufferAttribute(col, 3));
      if (index.length) geom.setIndex(index);
      geom.computeVertexNormals();
      const mat = new THREE.MeshLambertMaterial({ vertexColors: true, side: THREE.DoubleSide });
      // A 1-wide slice has no triangles: draw its elements as points, which pick the same way.
      this.mesh = index.length ? new THREE.Mesh(geom, mat) : new THREE.Points(geom, new THREE.PointsMaterial({ vertexColors: true, size: 0.05 }));
      if (!index.length) mat.dispose();
    }
    this.scene.add(this.mesh);
    let box;
    if (this.mesh.isInstancedMesh) { this.mesh.computeBoundingBox(); box = this.mesh.boundingBox; }
    else { this.mesh.geometry.computeBoundingBox(); box = this.mesh.geometry.boundingBox; }
    box.getCenter(this.target);
    this.render();
  }

  render() {
    const w = this.host.clientWidth || 640, h = Math.round(Math.min(Math.max(w * 0.62, 240), 560));
    if (this.canvas.width !== Math.round(w * this.renderer.getPixelRatio())) this.renderer.setSize(w, h);
    this.camera.aspect = w / h;
    const { theta, phi, radius } = this.orbit;
    this.camera.position.set(radius * Math.sin(phi) * Math.sin(theta), radius * Math.cos(phi),
                             radius * Math.sin(phi) * Math.cos(theta)).add(this.target);
    this.camera.lookAt(this.target);
    this.camera.updateProjectionMatrix();
    this.renderer.render(this.scene, this.camera);
  }
}
