/*
 * cellcurate: find and classify the nuclei of the current image with a cellcurate model, from QuPath.
 * Written by `curate qupath-script` for QuPath 0.5 / 0.6 (Automate > Script editor > Run).
 *
 * 1. Select one or more annotations (or none: the whole image, tissue detected automatically).
 * 2. Run this script. It exports the selected annotations as GeoJSON, runs `curate predict` on the
 *    image file with the model below, and imports the nuclei as detections (classified, with
 *    measurements), replacing the detections it finds inside the annotations (or in the image).
 *
 * Settings below were filled in by `curate qupath-script`; edit them freely.
 */
import java.nio.file.Files
import java.util.zip.GZIPInputStream
import qupath.lib.io.PathIO
import qupath.lib.objects.PathObject

// command that runs curate (a list: program and its first arguments)
def CURATE = {{CURATE}}
// the exported student: a TorchScript (.pt), ONNX (.onnx) or checkpoint folder
def MODEL = {{MODEL}}
// cpu, cuda, cuda:N or auto
def DEVICE = {{DEVICE}}
// more options for `curate predict`, e.g. ['--batch-size', '16']
def EXTRA = []

def imageData = getCurrentImageData()
if (imageData == null) {
    Dialogs.showErrorMessage('cellcurate', 'Open an image first.')
    return
}
def server = imageData.getServer()
def uris = server.getURIs()
if (uris.isEmpty() || uris[0].getScheme() != 'file') {
    Dialogs.showErrorMessage('cellcurate', 'The image is not a local file; cellcurate needs its path.')
    return
}
def imageFile = new File(uris[0])
def annotations = getSelectedObjects().findAll { it.isAnnotation() }
def work = Files.createTempDirectory('cellcurate').toFile()

def cmd = CURATE + ['predict', MODEL, imageFile.absolutePath, '--out', work.absolutePath, '--device', DEVICE]
def cal = server.getPixelCalibration()
if (cal.hasPixelSizeMicrons())
    cmd += ['--mpp', String.valueOf(cal.getAveragedPixelSizeMicrons())]
if (annotations) {
    def roi = new File(work, 'roi.geojson')
    exportObjectsToGeoJson(annotations, roi.absolutePath, 'FEATURE_COLLECTION')
    cmd += ['--roi', roi.absolutePath, '--tissue', 'all']
} else {
    cmd += ['--tissue', 'otsu']
}
cmd += EXTRA
println 'cellcurate: ' + cmd.join(' ')
def proc = new ProcessBuilder(cmd.collect { it.toString() }).redirectErrorStream(true).start()
proc.inputStream.eachLine { println it }
def rc = proc.waitFor()
if (rc != 0) {
    Dialogs.showErrorMessage('cellcurate', "curate predict failed (exit ${rc}); see the log.")
    return
}

// the nuclei: <name>.geojson.gz (slides) or <name>.geojson (plain images)
def outputs = work.listFiles().findAll { it.name.endsWith('.geojson.gz') || (it.name.endsWith('.geojson') && it.name != 'roi.geojson') }
if (outputs.isEmpty()) {
    Dialogs.showErrorMessage('cellcurate', "curate predict wrote no GeoJSON in ${work}")
    return
}
def geojson = outputs[0]
if (geojson.name.endsWith('.gz')) {
    def plain = new File(work, 'nuclei.geojson')
    new GZIPInputStream(new FileInputStream(geojson)).withStream { input -> plain.withOutputStream { it << input } }
    geojson = plain
}
List<PathObject> nuclei = PathIO.readObjects(geojson.toPath())

// replace earlier detections: those inside the annotations (or all of them)
def hierarchy = imageData.getHierarchy()
def old = getDetectionObjects().findAll { d ->
    !annotations || annotations.any { a -> a.getROI().contains(d.getROI().getCentroidX(), d.getROI().getCentroidY()) }
}
hierarchy.removeObjects(old, true)
hierarchy.addObjects(nuclei)
resolveHierarchy()
fireHierarchyUpdate()
println "cellcurate: ${nuclei.size()} nuclei imported, ${old.size()} earlier detections replaced"
work.deleteDir()
